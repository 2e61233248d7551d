"""An ImageNet-style folder of images for users' own validation sets, read with PIL.

Layout: one sub-folder per class (``root/<class>/<image>.jpg``), classes sorted by name and
numbered from 0, as is customary. Each image is resized on its shorter side and centre-cropped
(the standard evaluation transform; 256 -> 224 for ImageNet), then scaled to [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zsq_plugins.errors import DatasetNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_CROP_FRACTION = 0.875  # 224 / 256, the usual ImageNet evaluation crop


def load_image(
    path: str | os.PathLike[str],
    size: int | None = 224,
    resize_to: int | None = None,
    mode: str = "RGB",
) -> torch.Tensor:
    """One image as float (C, H, W) in [0, 1].

    ``resize_to`` sets the shorter side (default ``round(size / 0.875)``), then a centre crop
    of ``size`` x ``size`` is taken; ``size=None`` returns the image as stored.
    """
    with Image.open(path) as image:
        image = image.convert(mode)
        if size is not None:
            short = resize_to if resize_to is not None else round(size / IMAGENET_CROP_FRACTION)
            if short < size:
                raise ValueError(f"resize_to ({short}) must be at least the crop size ({size})")
            width, height = image.size
            scale = short / min(width, height)
            new_size = (max(short, round(width * scale)), max(short, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
            left = (new_size[0] - size) // 2
            top = (new_size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """``(image, class index)`` pairs from class sub-folders; images decoded on access."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int | None = 224,
        resize_to: int | None = None,
        mode: str = "RGB",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.samples = [
            (path, index)
            for index, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise DatasetNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders of {self.root}; "
                "expected root/<class name>/<image file>"
            )
        self.size, self.resize_to, self.mode = size, resize_to, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.size, self.resize_to, self.mode), label
