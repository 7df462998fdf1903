"""Bad data does not stop training: file-backed datasets leave out every bad file (and every malformed
line of their list) with one warning naming it and why, count them per reason, and the trainers log a
summary at the start and at the end of each run."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._checks import require
from ._index import item_index

logger = logging.getLogger("omniar.data")


class DataWarning(UserWarning):
    """A data file or list line was left out of a dataset."""


class Skipped:
    """What a dataset read from ``source`` left out: ``problems`` maps each file (or ``"line N"`` of
    ``source``) to ``(reason, detail)``; ``counts`` tallies the reasons."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.problems: dict[str, tuple[str, str]] = {}

    def add(self, item, reason: str, detail: str, warn: bool = True) -> None:
        """Record ``item`` and warn, once per item (a file listed twice is reported once); ``warn=False``
        for an item another process has already warned about."""
        key = str(item)
        if key not in self.problems:
            self.problems[key] = (reason, detail)
            if warn:
                warnings.warn(f"{self.source}: skipping {key}: {detail}", DataWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def counts(self) -> Counter:
        return Counter(reason for reason, _ in self.problems.values())

    def summary(self) -> str:
        """E.g. ``"data.jsonl: skipped 3 (empty: 1, too_short: 2)"``."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        return f"{self.source}: skipped {len(self)}" + (f" ({reasons})" if reasons else "")

    def require_some(self, count: int, name: str, what: str) -> None:
        """``ValueError`` naming the list, and its first problems, when it left no usable ``what``."""
        examples = "; ".join(f"{key}: {detail}" for key, (_, detail) in list(self.problems.items())[:3])
        require(count > 0, name, f"{self.source} lists no usable {what}"
                + (f" (skipped {len(self)}; {examples})" if examples else ""))


def file_problem(path: Path, kind: str) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` is missing or empty, else None."""
    if not path.is_file():
        return "missing", f"{kind} not found"
    if path.stat().st_size == 0:
        return "empty", "empty file (0 bytes)"
    return None


class SkippingDataset(Dataset):
    """Base of the file-backed datasets: subclasses fill ``skipped`` while checking their files at
    construction, end their ``__init__`` with :meth:`finish_checks`, and implement ``__len__``,
    ``file(index)`` and ``load(index)``.

    A file can pass the header-level check and still fail to decode (truncated in the middle): its
    item is replaced by the next loadable index, deterministically; the process that found it (this one
    or a DataLoader worker) warns once and sets its flag in ``decode_failed``, a shared-memory tensor
    that every worker sees, so no process decodes it again. :meth:`collect_decode_failures` counts the
    files that workers flagged into ``skipped`` (``decode_error``)."""

    skipped: Skipped
    decode_failed: torch.Tensor

    def file(self, index: int):
        raise NotImplementedError

    def load(self, index: int):
        raise NotImplementedError

    def finish_checks(self, name: str, what: str) -> None:
        """``ValueError`` naming ``name`` when no usable ``what`` is left; then the decode-failure flags
        (created here, before any DataLoader worker starts, so that the workers share them)."""
        self.skipped.require_some(len(self), name, what)
        self.decode_failed = torch.zeros(len(self), dtype=torch.bool).share_memory_()

    def collect_decode_failures(self) -> Skipped:
        """``skipped``, with the files that DataLoader workers failed to decode (they warned already)."""
        for i in self.decode_failed.nonzero().flatten().tolist():
            self.skipped.add(self.file(i), "decode_error", "failed to decode in a DataLoader worker", warn=False)
        return self.skipped

    def __getitem__(self, index: int):
        n = len(self)
        index = item_index(index, n)
        for offset in range(n):
            i = (index + offset) % n
            if self.decode_failed[i]:  # failed before, in any process: do not decode it again
                continue
            try:
                return self.load(i)
            except (ValueError, OSError) as err:
                self.decode_failed[i] = True
                self.skipped.add(self.file(i), "decode_error", str(err))
        raise ValueError(f"dataset: no item from {self.skipped.source} decodes ({self.skipped.summary()})")


def log_skipped(engine, step: int, **datasets) -> None:
    """At the start and at the end of a run: each dataset's skip summary (at the end including the files
    DataLoader workers failed to decode) as a log warning (rank 0) and its count as the TensorBoard
    scalar ``skipped_files/<name>``; datasets that are not a :class:`SkippingDataset` are ignored."""
    for name, data in datasets.items():
        if not isinstance(data, SkippingDataset):
            continue
        skipped = data.collect_decode_failures()
        if engine.rank == 0 and len(skipped):
            logger.warning("%s data: %s; %d items left", name, skipped.summary(), len(data))
        engine.log_scalars({f"skipped_files/{name}": len(skipped)}, step)
