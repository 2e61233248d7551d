"""The labelled sample images shipped inside the foolbox wheel (20 per data set).

Found through the package's location on disk, without importing foolbox (which would pull in
its whole runtime for a folder of images). The label is the last number of the file name,
e.g. ``imagenet_00_243.jpg`` is ImageNet class 243.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from zsq_plugins.datasets.imagefolder import load_image
from zsq_plugins.errors import MissingDependencyError

SAMPLE_SETS = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")


def samples_dir() -> Path:
    """The ``data/`` folder of the installed foolbox package."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the labelled sample images come from the foolbox wheel, which is not installed; "
            "install it with: pip install 'zsq-plugins[imagenet]'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise MissingDependencyError(
            f"the foolbox package at {folder.parent} has no data/ folder; reinstall it with: "
            "pip install --force-reinstall 'foolbox==3.3.4'"
        )
    return folder


def labelled_samples(
    dataset: str = "imagenet", size: int | None = 224
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float (N, C, H, W) in [0, 1] and their int64 labels, in file-name order.

    ``size`` is the centre crop after resizing the shorter side to ``size / 0.875``; ``None`` keeps
    the stored size.
    """
    if dataset not in SAMPLE_SETS:
        raise ValueError(f"dataset must be one of {', '.join(SAMPLE_SETS)}; got {dataset!r}")
    files = sorted(p for p in samples_dir().iterdir() if p.name.startswith(f"{dataset}_"))
    if not files:
        raise MissingDependencyError(f"no {dataset} samples in {samples_dir()}")
    images = [load_image(path, size=size) for path in files]
    labels = [int(path.stem.rsplit("_", 1)[1]) for path in files]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
