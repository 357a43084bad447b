"""Measured machine limits (fp32 matmul FLOP/s, memory bandwidth) used to express throughput as a
fraction of what the hardware can do; shared by training logs and the benchmarks. Also the check
that a device a user names exists here."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from internvl35.models.cpu_matmul import onednn_product


def check_device(name: str | torch.device) -> torch.device:
    """The device `name` as torch sees it, or a ValueError that says what is wrong in one line
    (torch's own errors are an AssertionError for a build without CUDA and a 30-name list for a
    mistyped type, both deep inside the first tensor moved there)."""
    shown = repr(str(name))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {shown}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {shown}: no CUDA GPU is visible to this PyTorch ({torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {shown}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
        return dev
    try:  # other backends (mps, xpu, ...): usable if a tensor can live there
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {shown} is not usable here: {str(e).splitlines()[0]}") from None
    return dev


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
    """The rate of the fastest library torch multiplies with here: on CPU in fp32 both MKL (torch.mm)
    and oneDNN, whose rates differ by up to 1.5x on some CPUs (2-core AMD EPYC: 150-184 vs 208-223
    GFLOP/s at n = 2048), so the bound is what the machine does, not what one library does."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run() -> None:
        torch.mm(a, b)
        sync()

    runs = [run]
    if torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        bt = b.t().contiguous()  # a linear's weight: [out, in]
        runs.append(lambda: onednn_product(a, bt))
    return 2 * n**3 / min(best_of(r, 5) for r in runs)


def memory_bandwidth(gib: float = 2.0) -> float:
    """Read bandwidth in bytes/s: a reduction over a buffer far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / best_of(lambda: x.sum(), 5)


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed activation buffers inside the process (glibc's malloc; elsewhere a no-op -> False).

    By default glibc maps a block above its dynamic threshold (128 KB, rising to the largest block
    freed) from fresh kernel pages and returns free memory at the heap's top beyond twice that, so
    forward passes keep paying page faults that zero their activations again: mini's ViT over 64
    tiles on 2 cores took 238-249 ms that way vs 176 ms with blocks up to 32 MB kept (the job
    tcmalloc/jemalloc do for CPU inference elsewhere). The cost is up to `trim_threshold` of freed
    memory staying resident.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
