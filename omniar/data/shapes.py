"""Moving Shapes: a procedural, seeded text-video world small enough to train on a CPU.

One filled object (circle, square or up-pointing triangle) of one of five colours
moves left, right, up or down at constant speed over a black or white canvas. With
the default ``"exit"`` motion it stays fully inside the canvas in every frame, which
bounds the clip length (about 35 frames at 64 px); with ``"wrap"`` the canvas is a
torus along the motion: the object leaves one edge and re-enters at the opposite one,
drawn on both sides while it straddles the edge, so clips may be of any length and
every frame shows the object. Every clip is a pure function of ``(seed, index)``, so
splits are reproducible without storing any data.

A canvas ``size`` is a side (square) or a ``(height, width)`` pair. Object size and
speed are defined for a 64 px side and scale with the shorter side; a longer side
only gives the object more room to travel along it.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_choice, check_int, require
from ..pixels import from_uint8
from ._index import item_index

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255)}

# (color, shape, direction, background) combinations the training split never produces.
# Every single attribute value still occurs in training: only the combination is new.
HELDOUT: tuple[tuple[str, str, str, str], ...] = (
    ("red", "circle", "left", "black"),
    ("red", "triangle", "up", "white"),
    ("green", "square", "right", "white"),
    ("green", "circle", "down", "black"),
    ("green", "triangle", "right", "black"),
    ("blue", "triangle", "left", "white"),
    ("blue", "square", "up", "black"),
    ("blue", "circle", "right", "white"),
    ("yellow", "circle", "right", "black"),
    ("yellow", "triangle", "down", "white"),
    ("purple", "square", "down", "white"),
    ("purple", "circle", "up", "black"),
)
ALL_COMBINATIONS = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS))
TRAIN_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c not in HELDOUT)

TEMPLATES = (
    "a {color} {shape} moves {direction} on a {background} background",
    "a {color} {shape} moving {direction} over a {background} background",
    "on a {background} background, a {color} {shape} moves {direction}",
    "{color} {shape} going {direction}, {background} background",
)
SIZE_RANGE = (0.18, 0.28)  # object diameter / side as a fraction of the canvas's shorter side
SPEED_RANGE = (1.5, 2.5)  # pixels per frame at a 64 px shorter side, scaled with it
SIDE_RANGE = (32, 1024)  # canvas sides (multiples of 16); 1024 = the largest latent grid (limits.MAX_SCALE) x 8 px
_SUPERSAMPLE = 4  # sub-pixel samples per axis: anti-aliased edges make sub-pixel motion visible
_VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CLIP_MOTIONS = ("exit", "wrap")  # what happens at the canvas edge: see the module docstring
MOTIONS = CLIP_MOTIONS + ("mixed",)  # a dataset's: "mixed" draws each item's motion, exit or wrap, half each


@dataclass(frozen=True)
class ShapeClip:
    """The parameters that fully determine one clip."""

    color: str
    shape: str
    direction: str
    background: str
    diameter: float  # pixels
    speed: float  # pixels per frame
    start: tuple[float, float]  # object centre (x, y) in pixels at frame 0
    motion: str = "exit"  # one of CLIP_MOTIONS

    @property
    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction,
                "background": self.background}


def caption(color: str, shape: str, direction: str, background: str, template: int = 0) -> str:
    """Caption of a clip; ``template`` 0 is the canonical form, 1.. are paraphrases."""
    check_int(template, "template", 0, len(TEMPLATES) - 1)
    return TEMPLATES[template].format(color=color, shape=shape, direction=direction, background=background)


def vocabulary() -> list[str]:
    """Every word of every caption, sorted: a pipeline trained on Moving Shapes records it, so that prompts
    with other words get a warning."""
    template_words = re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(TEMPLATES)))
    return sorted({*template_words, *COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS})


def canvas(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a canvas given as one side (square) or a ``(height, width)`` pair, checked."""
    if isinstance(size, int) and not isinstance(size, bool):
        sides, names = (size, size), ("side", "side")
    else:
        require(isinstance(size, (tuple, list)) and len(size) == 2, "size",
                f"must be an int or a (height, width) pair, got {size!r}")
        sides, names = tuple(size), ("height", "width")
    low, high = SIDE_RANGE
    for side, name in zip(sides, names):
        require(isinstance(side, int) and not isinstance(side, bool), "size", f"{name} must be an int, got {side!r}")
        require(low <= side <= high and side % 16 == 0, "size",
                f"{name} must be a multiple of 16 in [{low}, {high}], got {side}")
    return sides


def _check_canvas(size: int | tuple[int, int], num_frames: int, motion: str = "exit",
                  motions: tuple[str, ...] = MOTIONS) -> tuple[int, int]:
    """``(height, width)`` of ``size``, checked with ``num_frames`` and ``motion`` (one of ``motions``: a clip's
    are :data:`CLIP_MOTIONS`, a dataset's :data:`MOTIONS`)."""
    height, width = canvas(size)
    check_int(num_frames, "num_frames", 1)
    check_choice(motion, "motion", motions)
    # Exit motion (also a mixed set's exit items): the slowest motion of the smallest object must still fit along
    # the shorter side (any direction may be drawn). Wrapping motion never runs out of canvas.
    need = SIZE_RANGE[0] + SPEED_RANGE[0] * (num_frames - 1) / 64
    require(motion == "wrap" or need <= 1.0, "num_frames",
            f"too long for the canvas: at most {int((1 - SIZE_RANGE[0]) * 64 / SPEED_RANGE[0]) + 1} frames "
            "(wrapping motion has no limit)")
    return height, width


def sample_clip(rng: np.random.Generator, combination: tuple[str, str, str, str],
                size: int | tuple[int, int] = 64, num_frames: int = 17, motion: str = "exit") -> ShapeClip:
    """Draw size, speed and start position so the object stays inside the canvas in every frame (``"exit"``
    motion) or in frame 0 (``"wrap"``: the draw of a one-frame clip, so the full size and speed ranges occur at
    any clip length).

    On a square canvas the formulas reduce to the square-only ones they replaced, so every clip drawn before
    non-square canvases existed is unchanged, bit for bit (tests/test_data_folder.py)."""
    height, width = _check_canvas(size, num_frames, motion, CLIP_MOTIONS)
    num_frames = 1 if motion == "wrap" else num_frames  # the frames the object must stay fully inside
    color, shape, direction, background = combination
    short = min(height, width)
    scale = short / 64
    vx, vy = _VELOCITY[direction]
    length = width if vx else height  # the canvas along the motion
    travel_frac = SPEED_RANGE[0] * (num_frames - 1) / 64
    d_frac = rng.uniform(SIZE_RANGE[0], min(SIZE_RANGE[1], 1.0 - travel_frac))
    diameter = d_frac * short
    max_speed = min(SPEED_RANGE[1] * scale, (length - diameter) / max(num_frames - 1, 1))
    speed = rng.uniform(SPEED_RANGE[0] * scale, max(max_speed, SPEED_RANGE[0] * scale))
    half = diameter / 2
    travel = speed * (num_frames - 1)
    lo = [half + max(0.0, -v) * travel for v in (vx, vy)]
    hi = [side - half - max(0.0, v) * travel for v, side in ((vx, width), (vy, height))]
    start = (float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1])))
    return ShapeClip(color, shape, direction, background, float(diameter), float(speed), start, motion)


def _span(c: float, r: float, n: int) -> tuple[int, int]:
    """Pixels ``[lo, hi)`` of an axis of ``n`` pixels that a shape of radius ``r`` centred at ``c`` may cover
    (one more on each side against rounding; empty when it lies off the canvas)."""
    lo = min(n, max(0, math.floor(c - r) - 1))
    return lo, max(lo, min(n, math.floor(c + r) + 2))


def _coverage(shape: str, cx: float, cy: float, d: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (height, width) float32, by supersampling.

    Only the shape's bounding box is sampled, so large canvases stay cheap; a pixel's coverage is a count of
    samples / 16, exact in float32, so it does not depend on the window."""
    s = _SUPERSAMPLE
    r = d / 2
    (x0, x1), (y0, y1) = _span(cx, r, width), _span(cy, r, height)
    x = (np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5)[None, :] / s - cx
    y = (np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5)[:, None] / s - cy
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    else:  # equilateral triangle of side d pointing up, centred on its bounding box
        h = d * np.sqrt(3) / 2
        yy = y + h / 2  # 0 at the apex, h at the base
        inside = (yy >= 0) & (yy <= h) & (np.abs(x) <= yy / np.sqrt(3))
    out = np.zeros((height, width), np.float32)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3), dtype=np.float32)
    return out


def render(clip: ShapeClip, size: int | tuple[int, int] = 64, num_frames: int = 17,
           times: list[int] | None = None) -> np.ndarray:
    """Render a clip to uint8 frames ``(T, H, W, 3)``; ``times`` picks a subset of the frame indices."""
    height, width = _check_canvas(size, num_frames, clip.motion, CLIP_MOTIONS)
    times = list(range(num_frames)) if times is None else times
    require(all(0 <= t < num_frames for t in times), "times", f"must lie in [0, {num_frames})")
    fg = np.asarray(COLORS[clip.color], np.float32)
    bg = np.asarray(BACKGROUNDS[clip.background], np.float32)
    vx, vy = _VELOCITY[clip.direction]
    frames = np.empty((len(times), height, width, 3), np.uint8)
    for i, t in enumerate(times):
        cx, cy = clip.start[0] + vx * clip.speed * t, clip.start[1] + vy * clip.speed * t
        centres = [(cx, cy)]
        if clip.motion == "wrap":  # the centre on the torus, and a copy one canvas either side along the motion
            # for the part beyond an edge (copies never overlap: the object is shorter than the canvas)
            cx, cy = cx % width, cy % height
            centres = [(cx + k * abs(vx) * width, cy + k * abs(vy) * height) for k in (-1, 0, 1)]
        a = sum(_coverage(clip.shape, x, y, clip.diameter, height, width) for x, y in centres)[..., None]
        frames[i] = np.rint(a * fg + (1 - a) * bg).astype(np.uint8)
    return frames


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, H, W)`` in [-1, 1]."""
    return from_uint8(torch.from_numpy(frames).permute(3, 0, 1, 2))


class MovingShapes(Dataset):
    """Seeded Moving Shapes clips with captions.

    Args:
        split: ``"train"`` (every combination except :data:`HELDOUT`), ``"heldout"``
            (only those 12) or ``"all"``.
        num_samples: dataset length; item ``i`` is a pure function of ``(seed, i)``.
        size: canvas side (square) or ``(height, width)``, sides multiples of 16 in :data:`SIDE_RANGE`.
        num_frames: frames per clip.
        seed: dataset seed; use different seeds for training and evaluation sets.
        paraphrase: pick a random caption template per item (training); otherwise canonical.
        motion: ``"exit"`` (default: the object stays inside the canvas, so ``num_frames`` is at most about
            35 at 64 px), ``"wrap"`` (it re-enters at the opposite edge: any ``num_frames``) or ``"mixed"``
            (each item exit or wrap, half each, drawn from its own stream: an exit item is item ``i`` of the
            exit set, a wrap item that of the wrap set; ``num_frames`` as for exit).
    Items: ``{"video": float (3, T, H, W) in [-1, 1], "caption": str, "attributes": dict}``.
    """

    def __init__(self, split: str = "train", num_samples: int = 1024, size: int | tuple[int, int] = 64,
                 num_frames: int = 17, seed: int = 0, paraphrase: bool | None = None, motion: str = "exit"):
        check_choice(split, "split", ("train", "heldout", "all"))
        check_int(num_samples, "num_samples", 1)
        check_int(seed, "seed", 0)
        _check_canvas(size, num_frames, motion)
        self.split, self.num_samples, self.size, self.num_frames, self.seed = split, num_samples, size, num_frames, seed
        self.motion = motion
        self.paraphrase = split == "train" if paraphrase is None else bool(paraphrase)
        self.combinations = {"train": TRAIN_COMBINATIONS, "heldout": HELDOUT, "all": ALL_COMBINATIONS}[split]

    def __len__(self) -> int:
        return self.num_samples

    def clip(self, index: int) -> tuple[ShapeClip, int]:
        """Clip parameters and caption template of item ``index``."""
        check_int(index, "index", 0, self.num_samples - 1)
        rng = np.random.default_rng([self.seed, index])
        combination = self.combinations[rng.integers(len(self.combinations))]
        template = int(rng.integers(len(TEMPLATES))) if self.paraphrase else 0
        motion = self.motion
        if motion == "mixed":
            motion = CLIP_MOTIONS[int(np.random.default_rng([self.seed, index, 1]).integers(2))]
        return sample_clip(rng, combination, self.size, self.num_frames, motion), template

    def __getitem__(self, index: int) -> dict:
        clip, template = self.clip(item_index(index, self.num_samples))
        return {
            "video": to_tensor(render(clip, self.size, self.num_frames)),
            "caption": caption(**clip.attributes, template=template),
            "attributes": clip.attributes,
        }
