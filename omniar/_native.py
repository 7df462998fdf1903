"""omniar's C kernels (``_native.c``, the fused generation steps of :mod:`omniar.backbone.fused`). :func:`library`
compiles the C file once per source and CPU with the machine's C compiler (``$CC``, else ``cc``) into
:func:`cache_dir` (``$OMNIAR_CACHE``, default ``~/.cache/omniar``) and loads it with ctypes; each caller declares
the functions it calls. Without a compiler, or if the build fails, those callers stay in torch (one warning)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ._pretrained import write_file_atomically

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11")
# with OpenMP the kernels' parts run on torch's threads (its libgomp.so.1 is the one already loaded); the second
# is the fallback where -fopenmp does not build (its simd pragmas only)
OPENMP = ("-fopenmp", "-fopenmp-simd")


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def build(compiler: str | None, cache: Path, source_file: Path = SOURCE) -> ctypes.CDLL | None:
    """The kernels (``source_file``, by default this package's) compiled by ``compiler`` into ``cache`` (once per
    source, flags, compiler and CPU), loaded: with OpenMP where it builds, else without (the kernels' parts then
    run one after another); None where they cannot be built at all (no compiler, not Linux: one warning)."""
    if compiler is None or platform.system() != "Linux":
        return None
    source = source_file.read_bytes()
    for openmp in OPENMP:
        flags = (*FLAGS, openmp)
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                         platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
        path = cache / f"omniar-{key}.so"
        try:
            if not path.is_file():
                cache.mkdir(parents=True, exist_ok=True)
                write_file_atomically(path, lambda tmp: subprocess.run(
                    [compiler, *flags, "-o", str(tmp), str(source_file), "-lm"], check=True, capture_output=True))
            return ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError) as e:
            error = e
    warnings.warn(f"omniar: C kernels unavailable, running in torch ({error})", stacklevel=3)
    return None


def cache_dir() -> Path:
    """Where the kernels are built: ``$OMNIAR_CACHE``, else ``$XDG_CACHE_HOME/omniar``, else ``~/.cache/omniar``,
    else (no home directory) ``omniar-cache-UID`` in the temporary folder."""
    if os.environ.get("OMNIAR_CACHE"):
        return Path(os.environ["OMNIAR_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "omniar"
    home = os.path.expanduser("~")
    if home != "~":
        return Path(home) / ".cache" / "omniar"
    return Path(tempfile.gettempdir()) / f"omniar-cache-{os.getuid()}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels for this process: built with ``$CC`` (else ``cc``) into :func:`cache_dir` on first use."""
    return build(shutil.which(os.environ.get("CC") or "cc"), cache_dir())
