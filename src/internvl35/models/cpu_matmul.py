"""Large fp32 products on CPU through oneDNN where it is the faster library on this machine.

torch's F.linear runs on MKL (or another BLAS); oneDNN, the library behind torch's mkldnn ops,
ships its own kernels. Which is faster depends on the CPU: on a 2-core AMD EPYC, F.linear reached
123-194 GFLOP/s over ViT and LLM prefill shapes and oneDNN 200-221 (the 2048^3 product: 150-184
vs 208-223), because MKL takes a slower path on CPUs it does not tune for. So the choice is
measured, once per process and thread count.
"""

from __future__ import annotations

import functools
import os
import time

import torch


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   activation: str = "none") -> torch.Tensor:
    """F.linear through oneDNN (weight [out, in], plain or pre-packed by mkldnn's reorder), with
    `activation` ("none" or "gelu", the exact erf form) applied in the product's output pass.
    oneDNN builds a kernel per shape on first use (1-5 ms for prefill shapes, measured), so callers
    whose row counts vary without bound (an engine's steps) round them with `padded_rows`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


def padded_rows(rows: int) -> int:
    """`rows` rounded up to one of 32 sizes per power of two (at least to a multiple of 8): under
    3.2% more rows from 256 on, and a bounded set of shapes whatever the row counts."""
    step = max(8, 1 << max(rows.bit_length() - 6, 0))
    return -(-rows // step) * step


@functools.cache
def onednn_faster(threads: int) -> bool:
    """Whether oneDNN computes a prefill-sized product (512 x 1024 x 1024) at least 3% faster than
    F.linear with `threads` threads (the caller's torch.get_num_threads()), best of seven alternating
    runs each after two warm-up calls (oneDNN builds its kernel on the first). The choice must not
    flip between processes, or neither speed nor the last bits of results would be repeatable: on
    the 2-core EPYC, oneDNN measured 1.10-1.30x faster with 2 threads over 10 processes this way
    (1.04-1.21x with one thread), while best of three after one warm-up against a 10% margin chose
    it in 4 of 8. Where the two libraries are within 3%, F.linear stays.
    INTERNVL35_CPU_MATMUL=onednn or =blas skips the measurement."""
    forced = os.environ.get("INTERNVL35_CPU_MATMUL", "auto")
    if forced not in ("auto", "onednn", "blas"):
        raise ValueError(f"INTERNVL35_CPU_MATMUL={forced!r}: use auto, onednn or blas")
    if not torch.backends.mkldnn.is_available() or forced != "auto":
        return forced == "onednn" and torch.backends.mkldnn.is_available()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    runs = {torch.nn.functional.linear: [], onednn_product: []}
    with torch.inference_mode():
        for f in runs:
            f(x, w)
            f(x, w)
        for _ in range(7):  # alternating: the machine's speed drifts within seconds
            for f, times in runs.items():
                t = time.perf_counter()
                f(x, w)
                times.append(time.perf_counter() - t)
    return min(runs[onednn_product]) < 0.97 * min(runs[torch.nn.functional.linear])
