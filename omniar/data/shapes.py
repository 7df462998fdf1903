"""Moving Shapes: a procedural, seeded text-video world small enough to train on a CPU.

One filled object (circle, square or up-pointing triangle) of one of five colours
moves left, right, up or down at constant speed over a black or white canvas and
stays fully inside it in every frame. Every clip is a pure function of
``(seed, index)``, so splits are reproducible without storing any data.
"""

from __future__ import annotations

import itertools
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
SIZE_RANGE = (0.18, 0.28)  # object diameter / side as a fraction of the canvas side
SPEED_RANGE = (1.5, 2.5)  # pixels per frame at a 64 px canvas, scaled with the size
_SUPERSAMPLE = 4  # sub-pixel samples per axis: anti-aliased edges make sub-pixel motion visible
_VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


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


def _check_canvas(size: int, num_frames: int) -> None:
    check_int(size, "size", 32, 256)
    require(size % 16 == 0, "size", f"must be a multiple of 16, got {size}")
    check_int(num_frames, "num_frames", 1)
    # Slowest motion of the smallest object must still fit inside the canvas.
    need = SIZE_RANGE[0] + SPEED_RANGE[0] * (num_frames - 1) / 64
    require(need <= 1.0, "num_frames",
            f"too long for the canvas: at most {int((1 - SIZE_RANGE[0]) * 64 / SPEED_RANGE[0]) + 1} frames")


def sample_clip(rng: np.random.Generator, combination: tuple[str, str, str, str], size: int = 64,
                num_frames: int = 17) -> ShapeClip:
    """Draw size, speed and start position so the object stays inside the canvas in every frame."""
    _check_canvas(size, num_frames)
    color, shape, direction, background = combination
    scale = size / 64
    travel_frac = SPEED_RANGE[0] * (num_frames - 1) / 64
    d_frac = rng.uniform(SIZE_RANGE[0], min(SIZE_RANGE[1], 1.0 - travel_frac))
    diameter = d_frac * size
    max_speed = min(SPEED_RANGE[1] * scale, (size - diameter) / max(num_frames - 1, 1))
    speed = rng.uniform(SPEED_RANGE[0] * scale, max(max_speed, SPEED_RANGE[0] * scale))
    half = diameter / 2
    vx, vy = _VELOCITY[direction]
    travel = speed * (num_frames - 1)
    lo = [half + max(0.0, -v) * travel for v in (vx, vy)]
    hi = [size - half - max(0.0, v) * travel for v in (vx, vy)]
    start = (float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1])))
    return ShapeClip(color, shape, direction, background, float(diameter), float(speed), start)


def _coverage(shape: str, cx: float, cy: float, d: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (size, size) float32, by supersampling."""
    s = _SUPERSAMPLE
    coords = (np.arange(size * s, dtype=np.float32) + 0.5) / s
    x, y = coords[None, :] - cx, coords[:, None] - cy
    r = d / 2
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    else:  # equilateral triangle of side d pointing up, centred on its bounding box
        h = d * np.sqrt(3) / 2
        yy = y + h / 2  # 0 at the apex, h at the base
        inside = (yy >= 0) & (yy <= h) & (np.abs(x) <= yy / np.sqrt(3))
    return inside.reshape(size, s, size, s).mean(axis=(1, 3), dtype=np.float32)


def render(clip: ShapeClip, size: int = 64, num_frames: int = 17, times: list[int] | None = None) -> np.ndarray:
    """Render a clip to uint8 frames ``(T, H, W, 3)``; ``times`` picks a subset of the frame indices."""
    _check_canvas(size, num_frames)
    times = list(range(num_frames)) if times is None else times
    require(all(0 <= t < num_frames for t in times), "times", f"must lie in [0, {num_frames})")
    fg = np.asarray(COLORS[clip.color], np.float32)
    bg = np.asarray(BACKGROUNDS[clip.background], np.float32)
    vx, vy = _VELOCITY[clip.direction]
    frames = np.empty((len(times), size, size, 3), np.uint8)
    for i, t in enumerate(times):
        cx, cy = clip.start[0] + vx * clip.speed * t, clip.start[1] + vy * clip.speed * t
        a = _coverage(clip.shape, cx, cy, clip.diameter, size)[..., None]
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
        size: canvas side, a multiple of 16 in [32, 256].
        num_frames: frames per clip.
        seed: dataset seed; use different seeds for training and evaluation sets.
        paraphrase: pick a random caption template per item (training); otherwise canonical.
    Items: ``{"video": float (3, T, H, W) in [-1, 1], "caption": str, "attributes": dict}``.
    """

    def __init__(self, split: str = "train", num_samples: int = 1024, size: int = 64, num_frames: int = 17,
                 seed: int = 0, paraphrase: bool | None = None):
        check_choice(split, "split", ("train", "heldout", "all"))
        check_int(num_samples, "num_samples", 1)
        check_int(seed, "seed", 0)
        _check_canvas(size, num_frames)
        self.split, self.num_samples, self.size, self.num_frames, self.seed = split, num_samples, size, num_frames, seed
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
        return sample_clip(rng, combination, self.size, self.num_frames), template

    def __getitem__(self, index: int) -> dict:
        clip, template = self.clip(item_index(index, self.num_samples))
        return {
            "video": to_tensor(render(clip, self.size, self.num_frames)),
            "caption": caption(**clip.attributes, template=template),
            "attributes": clip.attributes,
        }
