"""UDA data: image domains read from folders or list files, and the offline digits domains.

* Image domains: an ``ImageFolder`` directory (one sub-folder per class) or a list file of ``path label``
  lines (relative paths resolved against the list's folder, labels integer class ids).
* Digits, for the offline UDA benchmark: printed (rendered from the machine's fonts) -> handwritten
  (scikit-learn's bundled UCI digits), plus a 62-class printed alphanumeric set used to pre-train the
  backbone and its "pre-trained head" (no ImageNet weights exist offline). Images are 3 x 32 x 32
  floats in [-1, 1], white ink on black, like the UCI scans.
"""

from __future__ import annotations

import copy
import os
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .._checks import check_int, require
from ..data._index import item_index
from ..data.skipped import Skipped, SkippingDataset, file_problem, logger
from ..pixels import from_uint8


# ----------------------------------------------------------------- image domains
def image_transform(size: int, augment: bool = False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
                    ) -> transforms.Compose:
    """Evaluation: resize + centre crop to ``size``. Training (``augment``): resize to 8/7 of ``size``,
    random crop and horizontal flip. Then normalise with the backbone's ``mean``/``std``."""
    crop = [transforms.Resize(round(size * 8 / 7)), transforms.RandomCrop(size), transforms.RandomHorizontalFlip()] \
        if augment else [transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


MIN_IMAGE_SIDE = 8  # only images too small to show anything: benchmarks hold small object crops
MAX_CLASSES = 100_000  # list-file labels are class ids below this: a typo must not allocate 10^8 class names


def image_problem(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` is not a usable image, else None; reads the header only."""
    problem = file_problem(path, "image")
    if problem is not None:
        return problem
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return "unreadable", f"not a readable image ({err})"
    if min(width, height) < MIN_IMAGE_SIDE:
        return "wrong_size", f"{width}x{height} pixels; needs a short side >= {MIN_IMAGE_SIDE}"
    return None


def is_grayscale(path: Path) -> bool:
    """True for a mode without colour channels (palettes hold colours); such images load as RGB."""
    with Image.open(path) as img:
        return img.mode not in ("P", "PA") and Image.getmodebands(img.mode) < 3


def read_image_list(list_file: Path, skipped: Skipped) -> list[tuple[Path, int]]:
    """``(path, label)`` of the list's well-formed lines; malformed ones go to ``skipped`` with their numbers."""
    items = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        label = parts[-1]
        # isdigit() alone admits "²" and other non-ASCII digits; the length test keeps int() small
        if len(parts) != 2 or not (label.isascii() and label.isdigit() and len(label) <= len(str(MAX_CLASSES))
                                   and int(label) < MAX_CLASSES):
            skipped.add(f"line {line_no}", "malformed_line",
                        f"expected 'path label' (label an integer 0..{MAX_CLASSES - 1}), got {line!r}")
            continue
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else list_file.parent / parts[0]
        items.append((path, int(label)))
    return items


def walk_image_folder(root: Path, classes: list[str], skipped: Skipped) -> list[tuple[Path, int]]:
    """``(path, class id)`` of the image files under each class folder, in sorted order. Directory symlinks
    are not followed (a link back into the tree loops or repeats files; one out of it is not the domain):
    each goes to ``skipped``. A file reached twice (file symlinks, hard links) counts once."""
    items, seen = [], set()
    for label, name in enumerate(classes):
        for folder, dirs, files in sorted(os.walk(root / name)):  # os.walk never descends into directory links
            for d in sorted(dirs):
                if os.path.islink(os.path.join(folder, d)):
                    skipped.add(Path(folder, d), "dir_symlink", "directory symlink, not followed")
            for f in sorted(files):
                path = Path(folder, f)
                if not f.lower().endswith(IMG_EXTENSIONS):
                    continue
                try:
                    stat = path.stat()
                    identity = (stat.st_dev, stat.st_ino)
                except OSError:  # a broken link: image_problem reports it as missing
                    identity = path
                if identity in seen:
                    skipped.add(path, "duplicate", "the same file as an earlier item")
                    continue
                seen.add(identity)
                items.append((path, label))
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
        self.grayscale = sum(is_grayscale(path) for path, _ in self.items)  # counted here, converted in load()
        if self.grayscale:
            logger.warning("%s: %d of %d images are grayscale; they are converted to RGB", skipped.source,
                           self.grayscale, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def file(self, index: int) -> Path:
        return self.items[index][0]

    def with_transform(self, transform) -> ImageDomain:
        """The same items, skip records and decode-failure flags read through another ``transform`` (e.g.
        an un-augmented view of a training domain), without checking the files again."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def load_domain(path: str | os.PathLike, image_size: int = 224, name: str = "domain", augment: bool = False,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> ImageDomain:
    """An image domain from a folder (``ImageFolder`` layout: files with image extensions, others are
    ignored) or a list file, with a ``classes`` attribute; clear errors otherwise.

    Bad data is left out, never fatal: each image is checked from its header and skipped with one
    ``DataWarning`` when ``missing``, ``empty``, ``unreadable`` (not an image) or ``wrong_size`` (a side
    under ``MIN_IMAGE_SIDE`` pixels); in a folder, directory symlinks are not followed (``dir_symlink``)
    and a file reached twice is kept once (``duplicate``); malformed list lines (a label that is not an
    ASCII integer below ``MAX_CLASSES``) are skipped as ``malformed_line`` with their line numbers; an
    image that fails to decode later is replaced by the next item (``decode_error``). The counts are in
    ``skipped``; no usable image raises ``ValueError``. Grayscale images are converted to RGB, as the
    BiPC reference does, and counted in ``grayscale`` (one log warning). A list file's classes come from
    all its well-formed lines, so skipped images never change them."""
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
        for link in sorted(p for p in path.iterdir() if p.is_symlink() and p.is_dir()):
            skipped.add(link, "dir_symlink", "directory symlink, not followed (not a class folder)")
        classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink())
        require(len(classes) > 0, name, f"{path} has no class sub-folders (ImageFolder layout expected)")
        items = walk_image_folder(path, classes, skipped)
        empty = sorted(set(classes) - {classes[label] for _, label in items})
        require(not empty, name, f"{path}: class folders without any image file: {', '.join(empty)}")
    return ImageDomain(items, classes, transform, skipped, name)


# ------------------------------------------------------------------------ digits
DIGITS = string.digits
ALNUM = string.digits + string.ascii_uppercase + string.ascii_lowercase  # 62 classes
SIZE = 32
_SKIP_FONTS = ("cmex", "cmsy", "STIXSiz", "NonUni", "LastResort", "MathTeX")  # symbol-only or glyph-less fonts


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """TrueType fonts on this machine: the system's (/usr/share/fonts, e.g. DejaVu, Liberation) and
    matplotlib's bundled set, minus symbol-only faces; the set, and so the source domain, varies by machine."""
    import matplotlib

    roots = [Path("/usr/share/fonts"), Path(matplotlib.get_data_path()) / "fonts" / "ttf"]
    by_name = {}  # DejaVu is both a system font and bundled with matplotlib: count each face once
    for root in roots:
        for p in sorted(root.rglob("*.ttf")) if root.is_dir() else ():
            if not any(s in p.name for s in _SKIP_FONTS):
                by_name.setdefault(p.name, str(p))
    usable = tuple(f for _, f in sorted(by_name.items()) if _draws_every(f, ALNUM))
    require(len(usable) > 0, "fonts", "no usable .ttf fonts found (matplotlib ships some; is it installed?)")
    return usable


def _draws_every(font: str, chars: str) -> bool:
    """True if the font has a visible glyph for each character (symbol fonts map letters to nothing)."""
    face = ImageFont.truetype(font, 24)
    for char in chars:
        img = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(img).text((4, 2), char, fill=255, font=face)
        if not np.asarray(img).any():
            return False
    return True


def _to_tensor(gray: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (3, H, W) float in [-1, 1]."""
    return from_uint8(torch.from_numpy(gray)).expand(3, -1, -1).clone()


def render_char(char: str, font: str, rng: np.random.Generator, augment: bool = True) -> torch.Tensor:
    """One printed character, randomly scaled, shifted, rotated, thickened, blurred and noised."""
    canvas = 64
    size = int(rng.integers(44, 60)) if augment else 52
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    face = ImageFont.truetype(font, size)
    stroke = int(rng.integers(0, 3)) if augment else 0
    box = draw.textbbox((0, 0), char, font=face, stroke_width=stroke)
    x = (canvas - (box[2] - box[0])) / 2 - box[0] + (rng.normal(0, 3) if augment else 0)
    y = (canvas - (box[3] - box[1])) / 2 - box[1] + (rng.normal(0, 3) if augment else 0)
    draw.text((x, y), char, fill=255, font=face, stroke_width=stroke, stroke_fill=255)
    if augment:
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
    out = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), np.float32)
    if augment:
        out = out * rng.uniform(0.7, 1.0) + rng.normal(0, 8, out.shape)
    return _to_tensor(np.clip(out, 0, 255).astype(np.uint8))


class PrintedCharacters(Dataset):
    """Seeded rendered characters; item i is a pure function of (seed, i).

    ``charset`` "digits" (10 classes: the UDA source) or "alnum" (62 classes: pre-training).
    """

    def __init__(self, charset: str = "digits", num_samples: int = 5000, seed: int = 0, augment: bool = True):
        require(charset in ("digits", "alnum"), "charset", f"must be 'digits' or 'alnum', got {charset!r}")
        check_int(num_samples, "num_samples", 1)
        check_int(seed, "seed", 0)
        self.chars = DIGITS if charset == "digits" else ALNUM
        self.classes = list(self.chars)
        self.num_samples, self.seed, self.augment = num_samples, seed, augment
        self.fonts = font_files()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = item_index(index, self.num_samples)
        rng = np.random.default_rng([self.seed, index])
        label = index % len(self.chars)  # balanced classes
        font = self.fonts[int(rng.integers(len(self.fonts)))]
        return render_char(self.chars[label], font, rng, self.augment), label


class HandwrittenDigits(Dataset):
    """scikit-learn's bundled UCI handwritten digits (1797 scans of 8x8), upsampled to 32x32."""

    def __init__(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.from_numpy(data.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        big = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        self.images = big.mul(2).sub(1).expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.from_numpy(data.target).long()
        self.classes = list(DIGITS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
