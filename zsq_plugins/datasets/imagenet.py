"""A flat folder of labelled ImageNet images named ``<wnid>_<anything>.JPEG``.

The layout of the public "one image per ImageNet class" sample sets: the label of a file is
the ILSVRC-2012 class index of the WordNet id its name starts with, i.e. its position in the
sorted list of the 1,000 ILSVRC-2012 wnids (``n01440764`` tench = 0 ... ``n15075141`` toilet
tissue = 999), shipped with the package as ``imagenet_wnids.txt``.

The folder is the ``root`` argument or the ``ZSQ_IMAGENET_DIR`` environment variable. No
image of it ships with the package or is needed by its tests.

``imagenet_split`` divides such a set into a fixed calibration pool and an evaluation set
that never overlap: the benchmark calibrates on the first and evaluates on the second.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

from zsq_plugins.datasets.imagefolder import IMAGE_SUFFIXES, load_image
from zsq_plugins.errors import DatasetNotFoundError

ENV_VAR = "ZSQ_IMAGENET_DIR"
CALIBRATION_POOL = 256
"""Images of the calibration pool of ``imagenet_split``: the rest are for evaluation."""
_WNID = re.compile(r"^(n\d{8})_")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ILSVRC-2012 WordNet ids in class-index order (sorted)."""
    text = resources.files("zsq_plugins.datasets").joinpath("imagenet_wnids.txt").read_text()
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RuntimeError("the packaged imagenet_wnids.txt is damaged; reinstall zsq-plugins")
    return wnids


def imagenet_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of labelled images: ``root``, else ``$ZSQ_IMAGENET_DIR``."""
    if root is None:
        root = os.environ.get(ENV_VAR)
        if not root:
            raise DatasetNotFoundError(
                "no ImageNet image folder given: pass root=<folder of <wnid>_<name>.JPEG files> "
                f"(zsq: --imagenet-dir) or set {ENV_VAR}=<that folder>"
            )
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet image folder {folder} does not exist (given as root or {ENV_VAR}); "
            "expected a folder of files named <wnid>_<name>.JPEG"
        )
    return folder


class ImageNetSamples(Dataset[tuple[torch.Tensor, int]]):
    """``(image, ILSVRC-2012 class index)`` pairs from a flat folder of ``<wnid>_*.JPEG``
    files, in file-name order; images decoded on access with the standard evaluation
    transform (shorter side to ``size / 0.875``, centre crop ``size``), in [0, 1]."""

    def __init__(self, root: str | os.PathLike[str] | None = None, size: int = 224) -> None:
        self.root = imagenet_dir(root)
        files = sorted(
            p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DatasetNotFoundError(
                f"{self.root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); expected "
                "files named <wnid>_<name>.JPEG"
            )
        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        unnamed = [p.name for p in files if not _WNID.match(p.name)]
        unknown = [p.name for p in files if _WNID.match(p.name) and _wnid(p) not in index]
        if unnamed or unknown:
            parts = []
            if unnamed:
                parts.append(f"{len(unnamed)} without a leading wnid ({', '.join(unnamed[:3])})")
            if unknown:
                parts.append(
                    f"{len(unknown)} whose wnid is not an ILSVRC-2012 class "
                    f"({', '.join(unknown[:3])})"
                )
            raise DatasetNotFoundError(
                f"{self.root}: {' and '.join(parts)}. Every image must be named "
                "<wnid>_<name>.JPEG with one of the 1,000 ILSVRC-2012 wnids; move the others "
                "out of the folder."
            )
        self.samples = [(path, index[_wnid(path)]) for path in files]
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[item]
        return load_image(path, self.size), label

    def tensors(self, items: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The images ``items`` (default: all) as one float tensor and their labels."""
        items = list(range(len(self))) if items is None else items
        pairs = [self[i] for i in items]
        images = torch.stack([image for image, _ in pairs]) if pairs else torch.empty(0)
        return images, torch.tensor([label for _, label in pairs], dtype=torch.int64)


def _wnid(path: Path) -> str:
    match = _WNID.match(path.name)
    assert match is not None
    return match.group(1)


def imagenet_split(
    dataset: ImageNetSamples, calibration: int | None = None
) -> tuple[list[int], list[int]]:
    """Items of ``dataset`` for the calibration pool and for evaluation, disjoint.

    The pool is the ``calibration`` images (default ``CALIBRATION_POOL``, 256) whose file
    names have the smallest SHA-256 digests: a fixed choice that any tool can reproduce,
    unrelated to class order (so not all dogs), and stable when files are added elsewhere
    in the folder. The evaluation items are all the others, in file-name order."""
    calibration = CALIBRATION_POOL if calibration is None else calibration
    if not 0 < calibration < len(dataset):
        raise ValueError(
            f"calibration must be between 1 and {len(dataset) - 1} (the folder has "
            f"{len(dataset)} images), got {calibration}"
        )
    by_digest = sorted(
        range(len(dataset)),
        key=lambda i: hashlib.sha256(dataset.samples[i][0].name.encode()).hexdigest(),
    )
    pool = sorted(by_digest[:calibration])
    chosen = set(pool)
    return pool, [i for i in range(len(dataset)) if i not in chosen]
