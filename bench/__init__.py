"""The benchmark harness: sweeps -> cases -> timed samples -> results store -> reports."""
