"""RMSNorm as a cutile-bench workload, declared from outside the harness (docs/workloads.md)."""
