"""Measuring: sweep files into cases, cases into isolated workers, workers into timed samples."""
