"""Embedded default weights shipped inside the package (diffusers-style folders)."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent
# Assets shipped as a component of another: the tokenizer is stored once, inside the default
# pipeline, which keeps the package (and every copy of the source tree) one tokenizer's weights smaller.
_COMPONENTS = {"shapes-tokenizer": "shapes-t2v/video_tokenizer"}


def available() -> list[str]:
    """Names of the shipped assets."""
    folders = [p.name for p in _ROOT.iterdir() if p.is_dir() and not p.name.startswith("_")]
    return sorted(folders + [name for name, sub in _COMPONENTS.items() if (_ROOT / sub).is_dir()])


def path(name: str) -> Path:
    """Folder of the shipped asset ``name`` (e.g. ``"shapes-tokenizer"``)."""
    if name not in available():  # also refuses paths, empty and non-string names
        raise ValueError(f"name: no shipped asset {name!r}; available: {available()}")
    return _ROOT / _COMPONENTS.get(name, name)
