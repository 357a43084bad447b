"""Shared helpers of the benchmarks (the measurements themselves live in `internvl35.hardware`)."""

from internvl35.hardware import best_of, matmul_peak_flops, memory_bandwidth

__all__ = ["best_of", "matmul_peak_flops", "memory_bandwidth"]
