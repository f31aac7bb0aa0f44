"""Building the CPU kernels (backend "native" of the block-sparse operator and of the block top-k).

Each kernel is a C file (plus headers) built with the system C compiler (``cc``, or ``$CC``) into the
per-user cache (``longattn.core.cache``), keyed by the sources, the flags and the CPU's features, once per
machine. Nothing is downloaded; where x86-64 with AVX-512, a compiler or OpenMP is missing the build returns
the reason instead of raising, so callers fall back to their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from longattn.core.cache import cache_dir

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


@dataclass(frozen=True)
class Built:
    """The outcome of :func:`build_kernel`: the loaded library, or None and why; the build's seconds (0.0:
    loaded from the cache)."""

    library: ctypes.CDLL | None
    reason: str
    compile_seconds: float


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _target_dir() -> Path:
    """Where built libraries are kept; with caching off, a directory of this process."""
    root = cache_dir()
    return root / "native" if root is not None else Path(tempfile.mkdtemp(prefix="longattn-native-"))


def build_kernel(what: str, stem: str, source: Path, headers: tuple[Path, ...], abi_symbol: str, abi: int) -> Built:
    """Build (or load from the cache) ``source`` and check its ABI version.

    Args:
        what: the kernel's name in messages ("native kernel", "native top-k kernel").
        stem: file name prefix of the built library in the cache.
        abi_symbol: a C function ``int f(void)`` that returns the library's ABI version, compared to ``abi``.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return Built(None, f"the {what} is written for x86-64 with AVX-512, this machine is {platform.machine()}", 0.0)
    flags = cpu_flags()
    if "avx512f" not in flags or "avx512bw" not in flags:
        return Built(None, f"the {what} needs AVX-512 (avx512f, avx512bw), which this CPU lacks", 0.0)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return Built(None, f"no C compiler (cc / gcc / $CC) to build the {what}", 0.0)
    text = b"".join(p.read_bytes() for p in (source, *headers))
    key = hashlib.sha256(text + " ".join([cc, *FLAGS, *sorted(flags)]).encode()).hexdigest()[:16]
    target = _target_dir() / f"{stem}_{key}.so"
    seconds = 0.0
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        # Build beside the target and rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        run = subprocess.run([cc, *FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            os.unlink(tmp)
            return Built(None, f"building the {what} failed ({cc}): {run.stderr.strip()[-400:]}", 0.0)
        os.replace(tmp, target)
        seconds = time.perf_counter() - start
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return Built(None, f"loading the {what} failed: {err}", 0.0)
    if getattr(lib, abi_symbol)() != abi:
        return Built(None, f"the {what} library is stale (ABI mismatch); delete it from the cache", 0.0)
    return Built(lib, "", seconds)
