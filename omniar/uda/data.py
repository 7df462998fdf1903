"""Image domains for UDA: an ``ImageFolder`` directory (one sub-folder per class) or a list file of
``path label`` lines (relative paths resolved against the list's folder, labels integer class ids)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .._checks import check_int, require
from ..data.skipped import Skipped, SkippingDataset, file_problem


def image_transform(size: int, augment: bool = False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
                    ) -> transforms.Compose:
    """Evaluation: resize + centre crop to ``size``. Training (``augment``): resize to 8/7 of ``size``,
    random crop and horizontal flip. Then normalise with the backbone's ``mean``/``std``."""
    crop = [transforms.Resize(round(size * 8 / 7)), transforms.RandomCrop(size), transforms.RandomHorizontalFlip()] \
        if augment else [transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


MIN_IMAGE_SIDE = 8  # only images too small to show anything: benchmarks hold small object crops


def image_problem(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` is not a usable colour image, else None; reads the header only."""
    problem = file_problem(path, "image")
    if problem is not None:
        return problem
    try:
        with Image.open(path) as img:
            mode, (width, height) = img.mode, img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return "unreadable", f"not a readable image ({err})"
    if mode not in ("P", "PA") and Image.getmodebands(mode) < 3:  # palettes hold colours
        return "grayscale", f"mode {mode}; colour image needed"
    if min(width, height) < MIN_IMAGE_SIDE:
        return "wrong_size", f"{width}x{height} pixels; needs a short side >= {MIN_IMAGE_SIDE}"
    return None


def read_image_list(list_file: Path, skipped: Skipped) -> list[tuple[Path, int]]:
    """``(path, label)`` of the list's well-formed lines; malformed ones go to ``skipped`` with their numbers."""
    items = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            skipped.add(f"line {line_no}", "malformed_line", f"expected 'path label' (label >= 0), got {line!r}")
            continue
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else list_file.parent / parts[0]
        items.append((path, int(parts[1])))
    return items


class ImageDomain(SkippingDataset):
    """``(image, class id)`` items with ``classes`` (names) and ``skipped`` (what was left out, see
    :func:`load_domain`)."""

    def __init__(self, items: list[tuple[Path, int]], classes: list[str], transform, skipped: Skipped, name: str):
        self.classes, self.transform, self.skipped = classes, transform, skipped
        self.items = []
        for path, label in items:
            problem = image_problem(path)
            if problem is None:
                self.items.append((path, label))
            else:
                skipped.add(path, *problem)
        self.finish_checks(name, "images")

    def __len__(self) -> int:
        return len(self.items)

    def file(self, index: int) -> Path:
        return self.items[index][0]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def load_domain(path: str | os.PathLike, image_size: int = 224, name: str = "domain", augment: bool = False,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> ImageDomain:
    """An image domain from a folder (``ImageFolder`` layout: files with image extensions, others are
    ignored) or a list file, with a ``classes`` attribute; clear errors otherwise.

    Bad data is left out, never fatal: each image is checked from its header and skipped with one
    ``DataWarning`` when ``missing``, ``empty``, ``unreadable`` (not an image), ``grayscale`` (a mode
    without colour channels) or ``wrong_size`` (a side under ``MIN_IMAGE_SIDE`` pixels); malformed list
    lines are skipped as ``malformed_line`` with their line numbers; an image that fails to decode later
    is replaced by the next item (``decode_error``). The counts are in ``skipped``; no usable image
    raises ``ValueError``. A list file's classes come from all its well-formed lines, so skipped
    images never change them."""
    check_int(image_size, "image_size", 8)
    path = Path(path)
    require(path.exists(), name, f"not found: {path}")
    transform = image_transform(image_size, augment, mean, std)
    skipped = Skipped(path)
    if path.is_file():
        items = read_image_list(path, skipped)
        skipped.require_some(len(items), name, "images")
        classes = [str(i) for i in range(max(label for _, label in items) + 1)]
    else:
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        require(len(classes) > 0, name, f"{path} has no class sub-folders (ImageFolder layout expected)")
        try:
            items = [(Path(f), label) for f, label in
                     make_dataset(path, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)]
        except FileNotFoundError as err:  # class folders without any image file
            raise ValueError(f"{name}: {path}: {err}") from None
    return ImageDomain(items, classes, transform, skipped, name)
