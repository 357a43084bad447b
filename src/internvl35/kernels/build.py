"""Build the package's C kernels on first use: one C file per kernel, compiled with the machine's C
compiler for this CPU (`-march=native`: the kernels are tuned to its vector width) and OpenMP,
cached by source hash. Torch's own OpenMP runtime is already loaded in the process under the same
soname, so a kernel's parallel regions share torch's thread pool rather than adding one."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    root = os.environ.get("INTERNVL35_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(root) / "internvl35" / "kernels"


def _cpu() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return " ".join(sorted({ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))}))


def load_kernel(name: str) -> ctypes.CDLL | None:
    """The compiled kernel `name` (`name`.c next to this file), building it on first use; None, so
    that callers fall back to torch, when INTERNVL35_NATIVE=0, when no C compiler is found (a debug
    log line) or when the build or the cache directory fails (a warning, once)."""
    if os.environ.get("INTERNVL35_NATIVE", "1") == "0" or sys.platform != "linux":
        return None
    return _build(name, os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


@functools.cache
def _build(name: str, cc: str | None) -> ctypes.CDLL | None:
    src = Path(__file__).with_name(f"{name}.c")
    if cc is None:
        log.debug("no C compiler: %s runs through torch", name)
        return None
    # -march=native code runs only on CPUs like this one: a cache shared between machines keeps one per CPU
    key = hashlib.sha256(src.read_bytes() + " ".join((cc, *FLAGS, _cpu())).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{key}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # built aside, then renamed: atomic
                out = Path(tmp) / lib.name
                done = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
                if done.returncode != 0:
                    log.warning("building the %s kernel failed, torch runs instead: %s", name,
                                done.stderr.strip()[-2000:])
                    return None
                os.replace(out, lib)
        return ctypes.CDLL(str(lib))
    except OSError as e:  # an unwritable cache directory, a compiler that cannot start, a library that cannot load
        log.warning("the %s kernel is unavailable, torch runs instead: %s", name, e)
        return None
