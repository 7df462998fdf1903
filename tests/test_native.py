"""omniar's C kernels (omniar._native): where they are built, how a failed build falls back."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from omniar import _native

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C compiler: the kernels' callers stay in torch")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIAR_CACHE", str(tmp_path / "a"))
    assert _native.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OMNIAR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native.cache_dir() == tmp_path / "xdg" / "omniar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _native.cache_dir() == tmp_path / "home" / ".cache" / "omniar"
    monkeypatch.setattr(_native.os.path, "expanduser", lambda path: path)  # no home directory to be found
    assert _native.cache_dir().parent == Path(_native.tempfile.gettempdir())


def test_build_is_cached_and_a_missing_compiler_means_eager(tmp_path):
    cc = shutil.which(os.environ.get("CC") or "cc")
    assert _native.build(cc, tmp_path) is not None
    built = list(tmp_path.glob("omniar-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _native.build(cc, tmp_path) is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert _native.build(None, tmp_path / "none") is None
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    with pytest.warns(UserWarning, match="C kernels unavailable"):
        assert _native.build(str(bad), tmp_path / "bad") is None


def test_kernel_shares_torchs_openmp_runtime_or_builds_without_it(tmp_path, monkeypatch):
    """Built with OpenMP, the kernels bind to the libgomp torch loaded (its libgomp.so.1: no second copy of that
    runtime, so their parts run on torch's threads; other packages' renamed copies do not count); where -fopenmp
    does not build, they are built without."""
    assert _native.library() is not None
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if Path(line.split()[-1]).name.startswith("libgomp.so.1")}
    assert [Path(m).parent for m in mapped] == [Path(torch.__file__).parent / "lib"], mapped
    cc = shutil.which(os.environ.get("CC") or "cc")
    monkeypatch.setattr(_native, "OPENMP", ("-fno-such-option", "-fopenmp-simd"))
    assert _native.build(cc, tmp_path) is not None
    assert len(list(tmp_path.glob("omniar-*.so"))) == 1
