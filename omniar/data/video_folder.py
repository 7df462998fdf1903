"""A captioned video-folder dataset: a JSONL of ``{"video": path, "caption": text}`` lines.

Clips of ``num_frames`` frames are sampled (optionally resampled to a target
frame rate), resized on the short side and centre-cropped to ``size`` x ``size``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._checks import check_choice, check_float, check_int, require
from .video_io import read_video, video_info


def clip_indices(num_source: int, source_fps: float, num_frames: int, fps: float | None, start: float) -> list[int]:
    """Source frame indices of a clip of ``num_frames`` frames at ``fps`` (None = the source rate).

    ``start`` in [0, 1] places the clip within the valid range. Raises if the source is too short.
    A target rate above the source rate repeats frames; below it skips frames.
    """
    check_int(num_frames, "num_frames", 1)
    check_float(start, "start", 0.0, 1.0)
    if fps is not None:
        check_float(fps, "fps", 0.0, low_inclusive=False)
    step = 1.0 if fps is None or source_fps <= 0 else source_fps / fps
    span = (num_frames - 1) * step
    require(num_source > 0 and span <= num_source - 1, "video",
            f"has {num_source} frames; a {num_frames}-frame clip at this rate needs {int(np.ceil(span)) + 1}")
    # Whole-frame start, uniform over the valid starts for a uniform ``start``; offsets round half up
    # (Python's round() rounds half to even and would repeat frames at unit step).
    last_start = int(num_source - 1 - span)
    first = min(last_start, int(start * (last_start + 1)))
    return [first + int(i * step + 0.5) for i in range(num_frames)]


def resize_center_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, size, size) in [-1, 1]."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.permute(1, 0, 2, 3).div(127.5).sub(1).clamp(-1, 1)


def find_jsonl(root_or_jsonl: str | os.PathLike) -> Path:
    """The captions JSONL: the path itself, or the only ``*.jsonl`` file of a folder."""
    path = Path(root_or_jsonl)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        require(len(found) == 1, "root_or_jsonl",
                f"folder {path} must hold exactly one .jsonl file, found {[f.name for f in found]}")
        return found[0]
    require(path.is_file(), "root_or_jsonl", f"JSONL not found: {path}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Entries of a captions JSONL; relative video paths are resolved against the file's folder."""
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"root_or_jsonl: {path}:{line_no}: not valid JSON ({err.msg})") from None
        require(isinstance(item, dict) and isinstance(item.get("video"), str)
                and isinstance(item.get("caption"), str), "root_or_jsonl",
                f"{path}:{line_no}: needs string fields 'video' and 'caption'")
        video = Path(item["video"])
        entries.append({"video": video if video.is_absolute() else path.parent / video, "caption": item["caption"]})
    require(len(entries) > 0, "root_or_jsonl", f"{path} lists no videos")
    return entries


class VideoFolderDataset(Dataset):
    """Captioned clips listed in a JSONL file.

    Args:
        root_or_jsonl: a JSONL with one ``{"video": ..., "caption": ...}`` per line (relative
            video paths are relative to the JSONL's folder), or a folder holding exactly one.
        num_frames: frames per clip.
        size: output side (short-side resize + centre crop).
        fps: target frame rate (None keeps the source rate).
        sample: where the clip starts: ``random`` (seeded by (seed, index)), ``start`` or ``center``.
        seed: seed of the random clip starts.
    Items: ``{"video": float (3, T, size, size) in [-1, 1], "caption": str}``. Videos are opened
    lazily: a missing, unreadable or too short file raises ``ValueError`` when its item is loaded.
    """

    def __init__(self, root_or_jsonl: str | os.PathLike, num_frames: int = 17, size: int = 64,
                 fps: float | None = None, sample: str = "random", seed: int = 0):
        check_int(num_frames, "num_frames", 1)
        check_int(size, "size", 8)
        if fps is not None:
            check_float(fps, "fps", 0.0, low_inclusive=False)
        check_choice(sample, "sample", ("random", "start", "center"))
        check_int(seed, "seed", 0)
        self.jsonl = find_jsonl(root_or_jsonl)
        self.entries = read_jsonl(self.jsonl)
        self.num_frames, self.size, self.fps, self.sample, self.seed = num_frames, size, fps, sample, seed

    def __len__(self) -> int:
        return len(self.entries)

    def clip_start(self, index: int) -> float:
        """Position of item ``index``'s clip within its video, in [0, 1]."""
        if self.sample == "random":
            return float(np.random.default_rng([self.seed, index]).random())
        return 0.0 if self.sample == "start" else 0.5

    def load(self, index: int) -> dict:
        """Decode item ``index``; every bad-file error is a ``ValueError`` (the hook for skip-and-warn)."""
        entry = self.entries[index]
        try:
            count, source_fps = video_info(entry["video"])
            idx = clip_indices(count, source_fps, self.num_frames, self.fps, self.clip_start(index))
            video = resize_center_crop(read_video(entry["video"], idx), self.size)
        except ValueError as err:
            raise ValueError(f"{err} (item {index} of {self.jsonl}: {entry['video']})") from err
        return {"video": video, "caption": entry["caption"]}

    def __getitem__(self, index: int) -> dict:
        return self.load(index)
