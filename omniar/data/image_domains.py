"""Image domains for UDA: an ``ImageFolder`` directory (one sub-folder per class) or a list file of
``path label`` lines (relative paths resolved against the list's folder, labels integer class ids)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .._checks import check_int, require


def image_transform(size: int, augment: bool = False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
                    ) -> transforms.Compose:
    """Evaluation: resize + centre crop to ``size``. Training (``augment``): resize to 8/7 of ``size``,
    random crop and horizontal flip. Then normalise with the backbone's ``mean``/``std``."""
    crop = [transforms.Resize(round(size * 8 / 7)), transforms.RandomCrop(size), transforms.RandomHorizontalFlip()] \
        if augment else [transforms.Resize(size), transforms.CenterCrop(size)]
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


class ImageList(Dataset):
    """``path label`` lines; ``classes`` are the label ids as strings, 0..max."""

    def __init__(self, list_file: Path, transform, name: str):
        self.items = []
        for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            require(len(parts) == 2 and parts[1].lstrip("-").isdigit(), name,
                    f"{list_file}:{line_no}: expected 'path label', got {line!r}")
            path = Path(parts[0]) if Path(parts[0]).is_absolute() else list_file.parent / parts[0]
            require(path.is_file(), name, f"{list_file}:{line_no}: image not found: {path}")
            self.items.append((path, int(parts[1])))
        require(len(self.items) > 0, name, f"{list_file} lists no images")
        labels = {label for _, label in self.items}
        require(min(labels) >= 0, name, f"{list_file}: labels must be >= 0")
        self.classes = [str(i) for i in range(max(labels) + 1)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def load_domain(path: str | os.PathLike, image_size: int = 224, name: str = "domain", augment: bool = False,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Dataset:
    """An image domain from a folder or a list file, with a ``classes`` attribute; clear errors otherwise."""
    check_int(image_size, "image_size", 8)
    path = Path(path)
    require(path.exists(), name, f"not found: {path}")
    transform = image_transform(image_size, augment, mean, std)
    if path.is_file():
        return ImageList(path, transform, name)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    require(len(classes) > 0, name, f"{path} has no class sub-folders (ImageFolder layout expected)")
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as err:  # class folders without any image
        raise ValueError(f"{name}: {path}: {err}") from None
