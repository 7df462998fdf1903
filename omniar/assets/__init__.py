"""Embedded default weights shipped inside the package (diffusers-style folders)."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the shipped asset folders."""
    return sorted(p.name for p in _ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))


def path(name: str) -> Path:
    """Folder of the shipped asset ``name`` (e.g. ``"shapes-tokenizer"``)."""
    folder = _ROOT / name
    if not name or "/" in name or not folder.is_dir():
        raise ValueError(f"name: no shipped asset {name!r}; available: {available()}")
    return folder
