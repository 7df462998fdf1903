"""A captioned video-folder dataset: a JSONL of ``{"video": path, "caption": text}`` lines.

Clips of ``num_frames`` frames are sampled (optionally resampled to a target
frame rate), resized to cover ``size`` (a side, or ``(height, width)``) and centre-cropped to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import check_choice, check_float, check_int, require
from ..pixels import from_uint8
from .skipped import Skipped, SkippingDataset, file_problem
from .video_io import probe_video, read_video

MAX_ASPECT = 4.0  # longest/shortest side of a usable video: the centre crop keeps at least a quarter


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


def frame_size(size: int | tuple[int, int], name: str = "size") -> tuple[int, int]:
    """``(height, width)`` of a target given as one side (square) or a ``(height, width)`` pair, each >= 8."""
    if isinstance(size, (tuple, list)):
        require(len(size) == 2, name, f"must be an int or a (height, width) pair, got {size!r}")
        return check_int(size[0], name, 8), check_int(size[1], name, 8)
    side = check_int(size, name, 8)
    return side, side


def resize_center_crop(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, height, width) in [-1, 1] for ``size`` = side or (height, width):
    resized (antialiased) as little as covers the target, then centre-cropped to it."""
    th, tw = frame_size(size)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)  # for a square target: the short side becomes the side
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[:, :, top:top + th, left:left + tw]
    return from_uint8(x.permute(1, 0, 2, 3)).clamp(-1, 1)


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


def read_jsonl(path: Path, skipped: Skipped) -> list[dict]:
    """Entries of a captions JSONL; relative video paths are resolved against the file's folder.
    Malformed lines are left out, each recorded in ``skipped`` (and warned about) with its line number."""
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.add(f"line {line_no}", "malformed_line", f"not valid JSON ({err.msg})")
            continue
        if not (isinstance(item, dict) and isinstance(item.get("video"), str)
                and isinstance(item.get("caption"), str)):
            skipped.add(f"line {line_no}", "malformed_line", "needs string fields 'video' and 'caption'")
            continue
        video = Path(item["video"])
        entries.append({"video": video if video.is_absolute() else path.parent / video, "caption": item["caption"]})
    return entries


class VideoFolderDataset(SkippingDataset):
    """Captioned clips listed in a JSONL file.

    Args:
        root_or_jsonl: a JSONL with one ``{"video": ..., "caption": ...}`` per line (relative
            video paths are relative to the JSONL's folder), or a folder holding exactly one.
        num_frames: frames per clip.
        size: output frame size: a side (square) or ``(height, width)``; each video is resized as little as
            covers it and centre-cropped to it (``omniar data shapes --size 48x80`` clips read back whole at
            ``(48, 80)``).
        fps: target frame rate (None keeps the source rate).
        sample: where the clip starts: ``random`` (seeded by (seed, index)), ``start`` or ``center``.
        seed: seed of the random clip starts.
    Items: ``{"video": float (3, T, height, width) in [-1, 1], "caption": str}``.

    Bad data is left out, never fatal (see :mod:`omniar.data.skipped`): every video is checked once, at
    construction, from its headers, and skipped with one ``DataWarning`` when it is ``missing``,
    ``empty``, ``unreadable`` (not a video, or cut short before its index), ``grayscale`` (a grayscale
    pixel format), ``too_short`` (fewer frames than one clip at ``fps`` needs) or ``wrong_size`` (a height
    or width below the target's, which would be upscaled, or a long side over ``MAX_ASPECT`` times the
    short one, of which the centre crop would keep little). Malformed JSONL lines are skipped as ``malformed_line``
    with their line numbers. A video that passes but fails to decode is replaced at load time by the next
    item (``decode_error``, counted across DataLoader workers). ``skipped`` holds them all; nothing usable raises ``ValueError``.
    """

    def __init__(self, root_or_jsonl: str | os.PathLike, num_frames: int = 17, size: int | tuple[int, int] = 64,
                 fps: float | None = None, sample: str = "random", seed: int = 0):
        check_int(num_frames, "num_frames", 1)
        self.height, self.width = frame_size(size)
        if fps is not None:
            check_float(fps, "fps", 0.0, low_inclusive=False)
        check_choice(sample, "sample", ("random", "start", "center"))
        check_int(seed, "seed", 0)
        self.num_frames, self.size, self.fps, self.sample, self.seed = num_frames, size, fps, sample, seed
        self.jsonl = find_jsonl(root_or_jsonl)
        self.skipped = Skipped(self.jsonl)
        self.entries = []
        for entry in read_jsonl(self.jsonl, self.skipped):
            problem = self._problem(entry)
            if problem is None:
                self.entries.append(entry)
            else:
                self.skipped.add(entry["video"], *problem)
        self.finish_checks("root_or_jsonl", "videos")

    def _problem(self, entry: dict) -> tuple[str, str] | None:
        """(reason, detail) when ``entry``'s video cannot give clips, else None; keeps the frame count
        and rate for ``load``."""
        problem = file_problem(entry["video"], "video")
        if problem is not None:
            return problem
        try:
            info = probe_video(entry["video"])
        except (ValueError, OSError) as err:
            return "unreadable", str(err)
        if info.grayscale:
            return "grayscale", f"grayscale pixel format {info.pix_fmt}; colour video needed"
        short, long = sorted((info.width, info.height))
        if info.height < self.height or info.width < self.width or long > MAX_ASPECT * short:
            return "wrong_size", (f"{info.height}x{info.width} frames (height x width); needs at least "
                                  f"{self.height}x{self.width} and an aspect ratio <= {MAX_ASPECT:g}")
        try:
            clip_indices(info.num_frames, info.fps, self.num_frames, self.fps, 0.0)
        except ValueError as err:
            return "too_short", str(err)
        entry["num_frames"], entry["source_fps"] = info.num_frames, info.fps
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def clip_start(self, index: int) -> float:
        """Position of item ``index``'s clip within its video, in [0, 1]."""
        if self.sample == "random":
            return float(np.random.default_rng([self.seed, index]).random())
        return 0.0 if self.sample == "start" else 0.5

    def file(self, index: int) -> Path:
        return self.entries[index]["video"]

    def load(self, index: int) -> dict:
        """Decode item ``index`` (no skipping: ``__getitem__`` does that)."""
        entry = self.entries[index]
        idx = clip_indices(entry["num_frames"], entry["source_fps"], self.num_frames, self.fps, self.clip_start(index))
        return {"video": resize_center_crop(read_video(entry["video"], idx), self.size), "caption": entry["caption"]}
