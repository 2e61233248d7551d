"""Fashion-MNIST (Xiao et al., 2017) read from its original IDX files.

Looked for, in order: the ``root`` argument, the ``ZSQ_DATA_DIR`` environment variable, and
the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from zsq_plugins.errors import DatasetNotFoundError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "ZSQ_DATA_DIR"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # images (3-d), labels (1-d)

Split = Literal["train", "test"]


def candidate_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for the IDX files, in order."""
    dirs = []
    if root is not None:
        dirs.append(Path(root))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(DEBIAN_DIR)
    return dirs


def _find(name: str, dirs: list[Path]) -> Path | None:
    for directory in dirs:
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DatasetNotFoundError(
            f"{path} is not an IDX file with {ndim} dimension(s) (magic number {magic}); "
            "it may be truncated or not a Fashion-MNIST file. Reinstall the data set."
        )
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DatasetNotFoundError(
            f"{path} holds {len(data) - offset} values where its header promises {expected}; "
            "the file is truncated. Reinstall the data set."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_arrays(
    split: Split, root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 1, 28, 28) and labels as int64 (N,) for ``split``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dirs = candidate_dirs(root)
    image_name, label_name = _FILES[split]
    image_path, label_path = _find(image_name, dirs), _find(label_name, dirs)
    if image_path is None or label_path is None:
        searched = ", ".join(str(d) for d in dirs)
        raise DatasetNotFoundError(
            f"Fashion-MNIST ({split}) not found; searched: {searched}. Either install the "
            "Debian package (as root: apt-get update && apt-get install -y "
            "dataset-fashion-mnist), or put the four IDX files (.gz or not) in a folder and "
            f"pass it as root=... or set {ENV_VAR}=/that/folder."
        )
    images = _read_idx(image_path, 3)
    labels = _read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DatasetNotFoundError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels."
        )
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def fashion_mnist(split: Split, root: str | os.PathLike[str] | None = None) -> TensorDataset:
    """Fashion-MNIST as float images in [0, 1], shape (1, 28, 28), with integer labels."""
    images, labels = load_arrays(split, root)
    return TensorDataset(images.float().div_(255.0), labels)


def calibration_subset(
    num_samples: int = 1024, seed: int = 0, root: str | os.PathLike[str] | None = None
) -> torch.Tensor:
    """A fixed, seeded subset of the training images (labels dropped), in [0, 1].

    The real-data reference of the benchmarks: the few-shot upper bound that a zero-shot
    method tries to reach.
    """
    images, _ = load_arrays("train", root)
    if not 1 <= num_samples <= len(images):
        raise ValueError(f"num_samples must be in [1, {len(images)}], got {num_samples}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:num_samples]
    return images[index].float().div_(255.0)
