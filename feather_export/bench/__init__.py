"""Benchmarks: pruned vs unpruned latency side by side, the profiler, reports and the performance model."""
