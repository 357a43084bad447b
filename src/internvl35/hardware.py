"""Measured machine limits (fp32 matmul FLOP/s, memory bandwidth) used to express throughput as a
fraction of what the hardware can do; shared by training logs and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest wall time of `repeats` runs after one warm-up (the least noisy estimate)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak_flops(n: int = 2048, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> float:
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run() -> None:
        torch.mm(a, b)
        sync()

    return 2 * n**3 / best_of(run, 5)


def memory_bandwidth(gib: float = 2.0) -> float:
    """Read bandwidth in bytes/s: a reduction over a buffer far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / best_of(lambda: x.sum(), 5)
