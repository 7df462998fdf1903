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
    """
    step = 1.0 if fps is None or source_fps <= 0 else source_fps / fps
    span = (num_frames - 1) * step
    require(num_source > 0 and span <= num_source - 1, "video",
            f"has {num_source} frames; a {num_frames}-frame clip at this rate needs {int(np.ceil(span)) + 1}")
    first = start * (num_source - 1 - span)
    return [min(num_source - 1, int(round(first + i * step))) for i in range(num_frames)]


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


def read_jsonl(path: Path) -> list[dict]:
    """Entries of a captions JSONL; paths are resolved relative to the file's folder."""
    require(path.is_file(), "path", f"JSONL not found: {path}")
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"path: {path}:{line_no}: not valid JSON ({err.msg})") from None
        require(isinstance(item, dict) and isinstance(item.get("video"), str)
                and isinstance(item.get("caption"), str), "path",
                f"{path}:{line_no}: needs string fields 'video' and 'caption'")
        video = Path(item["video"])
        entries.append({"video": video if video.is_absolute() else path.parent / video, "caption": item["caption"]})
    require(len(entries) > 0, "path", f"{path} lists no videos")
    return entries


class VideoFolderDataset(Dataset):
    """Captioned clips from a JSONL file.

    Args:
        path: JSONL with one ``{"video": ..., "caption": ...}`` per line (relative video
            paths are relative to the JSONL's folder).
        num_frames: frames per clip.
        size: output side (short-side resize + centre crop).
        fps: target frame rate (None keeps the source rate).
        sample: where the clip starts: ``random`` (seeded by (seed, index)), ``start`` or ``center``.
    Items: ``{"video": float (3, T, size, size) in [-1, 1], "caption": str}``.
    """

    def __init__(self, path: str | os.PathLike, num_frames: int = 17, size: int = 64, fps: float | None = None,
                 sample: str = "random", seed: int = 0):
        check_int(num_frames, "num_frames", 1)
        check_int(size, "size", 8)
        if fps is not None:
            check_float(fps, "fps", 0.0, low_inclusive=False)
        check_choice(sample, "sample", ("random", "start", "center"))
        self.entries = read_jsonl(Path(path))
        self.num_frames, self.size, self.fps, self.sample, self.seed = num_frames, size, fps, sample, seed

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        count, source_fps = video_info(entry["video"])
        start = {"start": 0.0, "center": 0.5}.get(self.sample)
        if start is None:
            start = float(np.random.default_rng([self.seed, index]).random())
        idx = clip_indices(count, source_fps, self.num_frames, self.fps, start)
        return {"video": resize_center_crop(read_video(entry["video"], idx), self.size), "caption": entry["caption"]}
