"""Input validation shared by the public API: every error names the argument."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterable


def require(condition: bool, name: str, message: str) -> None:
    """Raise ``ValueError("<name>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{name}: {message}")


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer in ``[low, high]`` (bounds optional) and return it."""
    require(isinstance(value, int) and not isinstance(value, bool), name, f"must be an int, got {value!r}")
    if low is not None:
        require(value >= low, name, f"must be >= {low}, got {value}")
    if high is not None:
        require(value <= high, name, f"must be <= {high}, got {value}")
    return value


def check_float(value: Any, name: str, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Validate a finite real number in the given range and return it as float."""
    require(isinstance(value, (int, float)) and not isinstance(value, bool), name,
            f"must be a number, got {value!r}")
    value = float(value)
    require(math.isfinite(value), name, f"must be finite, got {value}")
    if low is not None:
        ok = value >= low if low_inclusive else value > low
        require(ok, name, f"must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None:
        ok = value <= high if high_inclusive else value < high
        require(ok, name, f"must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Validate a bool (not 0/1, not "yes": a config typo must not pass as a switch) and return it."""
    require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Validate membership in ``choices`` and return the value."""
    choices = tuple(choices)
    require(value in choices, name, f"must be one of {choices}, got {value!r}")
    return value


def check_keys(values: Any, name: str, known: Iterable[str]) -> dict:
    """Validate a mapping whose keys all come from ``known`` (a misspelled key must not be ignored) and return it."""
    require(isinstance(values, dict), name, f"must be a mapping, got {type(values).__name__}")
    known = set(known)
    unknown = sorted(set(values) - known, key=str)
    require(not unknown, name, f"unknown keys {unknown}; known: {sorted(known)}")
    return values


def check_text(value: Any, name: str) -> str:
    """Validate a str that encodes as UTF-8 (no lone surrogates, e.g. undecodable bytes of a command line)."""
    require(isinstance(value, str), name, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: is not valid text ({err.reason} at character {err.start})") from None
    return value


def check_output_path(path: Any, name: str, folder: bool = False) -> Path:
    """Validate a place to write a file (or, with ``folder``, a folder) before any work: an existing
    path must be of that kind, and its nearest existing ancestor a folder this process can write in."""
    require(isinstance(path, (str, os.PathLike)) and str(path) != "", name, f"must be a path, got {path!r}")
    path = Path(path)
    if path.exists():
        require(path.is_dir() == folder, name, f"{path} exists and is not a {'folder' if folder else 'file'}")
    # a folder is written into; a file (or a missing folder) is created in the nearest existing ancestor
    base = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
    require(base.is_dir(), name, f"cannot write {path}: {base} is not a folder")
    require(os.access(base, os.W_OK | os.X_OK), name, f"cannot write {path}: {base} is not writable")
    return path


@contextlib.contextmanager
def named(name: str):
    """A ValueError inside names ``name`` (how a command line spells the option) instead of the API argument:
    ``path: x not found`` -> ``model: x not found``."""
    try:
        yield
    except ValueError as err:
        _, sep, detail = str(err).partition(": ")
        raise ValueError(f"{name}: {detail if sep else err}") from None


def check_device(value: str, name: str = "device") -> "torch.device":
    """A device this machine has: ``cpu``, or ``cuda[:N]`` when CUDA is available."""
    import torch  # here, not at the top: the command line's --help must not wait for torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: must be cpu or cuda[:N], got {value!r}") from None
    require(device.type in ("cpu", "cuda"), name, f"must be cpu or cuda[:N], got {value!r}")
    if device.type == "cuda":
        require(torch.cuda.is_available(), name, f"{value!r}: CUDA is not available on this machine")
        require(device.index is None or device.index < torch.cuda.device_count(), name,
                f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def normal_file_mode() -> int:
    """The mode of a normal new file, ``0o666`` less the process umask (for files that tools create
    owner-only). Reading the umask means setting it: briefly to 0o077, so a file another thread creates
    meanwhile can only come out stricter, never more open."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask
