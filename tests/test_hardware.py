"""Process-level tuning: freed activation buffers are reused instead of faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import ctypes, resource, sys, torch
from internvl35.hardware import reuse_freed_memory
# start from a known state: glibc's initial threshold (128 KB), pinned so that it cannot adapt
assert ctypes.CDLL(None).mallopt(-3, 128 << 10)
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
def step():  # like a forward pass: several activations alive together, then all freed
    xs = [torch.ones(3 << 20) for _ in range(3)]  # 12 MB each
for _ in range(3):  # warm up
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    # 10 x 36 MB = 92,160 pages of 4 KB: mapped afresh on every allocation unless reused
    pinned, tuned = _faults("pinned"), _faults("tuned")
    assert pinned > 50_000 and tuned < 1_000, (pinned, tuned)


def test_check_device_names_what_is_wrong():
    import torch

    from internvl35.hardware import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^unknown device 'tpu': use cpu, cuda or cuda:N$"):
        check_device("tpu")
    # no CUDA here: no GPU is visible; with one: there is no 100th
    with pytest.raises(ValueError, match=r"^device 'cuda:99': (no CUDA GPU is visible|this machine has \d+ CUDA)"):
        check_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            check_device("cuda")
