import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import requires_fashion_mnist, requires_imagenet_extra
from zsq_plugins.datasets import (
    ImageFolder,
    calibration_subset,
    fashion_mnist,
    labelled_samples,
    load_image,
)
from zsq_plugins.datasets import fmnist as fmnist_module
from zsq_plugins.errors import DatasetNotFoundError


def _write_idx(path, array, magic, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "train", 50), ("test", "t10k", 20)):
        _write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051
        )
        _write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte",
            rng.integers(0, 10, (n,)),
            2049,
            compress=split == "train",
        )
    return tmp_path


@pytest.fixture
def no_debian_data(monkeypatch, tmp_path):
    monkeypatch.setattr(fmnist_module, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.delenv("ZSQ_DATA_DIR", raising=False)


def test_reads_idx_from_root_argument(fake_fmnist, no_debian_data):
    data = fashion_mnist("train", root=fake_fmnist)
    image, label = data[0]
    assert len(data) == 50
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert label.dtype == torch.int64
    assert len(fashion_mnist("test", root=fake_fmnist)) == 20  # uncompressed label file


def test_reads_from_environment_variable(fake_fmnist, no_debian_data, monkeypatch):
    monkeypatch.setenv("ZSQ_DATA_DIR", str(fake_fmnist))
    assert len(fashion_mnist("test")) == 20


def test_missing_data_names_both_ways_to_provide_it(no_debian_data, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist("test", root=tmp_path)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "ZSQ_DATA_DIR" in message and "root=" in message


def test_truncated_file_is_reported(fake_fmnist, no_debian_data):
    path = fake_fmnist / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as handle:
        payload = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(payload[:-100])
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        fashion_mnist("train", root=fake_fmnist)


def test_wrong_file_kind_is_reported(fake_fmnist, no_debian_data):
    labels = (fake_fmnist / "train-labels-idx1-ubyte.gz").read_bytes()
    (fake_fmnist / "train-images-idx3-ubyte.gz").write_bytes(labels)
    with pytest.raises(DatasetNotFoundError, match="not an IDX file"):
        fashion_mnist("train", root=fake_fmnist)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")  # type: ignore[arg-type]


def test_calibration_subset_is_seeded(fake_fmnist, no_debian_data):
    a = calibration_subset(16, seed=1, root=fake_fmnist)
    b = calibration_subset(16, seed=1, root=fake_fmnist)
    c = calibration_subset(16, seed=2, root=fake_fmnist)
    assert a.shape == (16, 1, 28, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_subset(0, root=fake_fmnist)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_subset(51, root=fake_fmnist)


@requires_fashion_mnist
def test_real_fashion_mnist_sizes():
    assert len(fashion_mnist("train")) == 60000
    test = fashion_mnist("test")
    assert len(test) == 10000
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10
    assert calibration_subset(1024).shape == (1024, 1, 28, 28)


def _save_png(path, size, color):
    Image.new("RGB", size, color).save(path)


def test_image_folder(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        _save_png(tmp_path / cls / "a.png", (40, 30), color)
        _save_png(tmp_path / cls / "b.jpg", (30, 50), color)
        (tmp_path / cls / "notes.txt").write_text("not an image")
    data = ImageFolder(tmp_path, size=16)
    assert data.classes == ["ant", "cat"]
    assert len(data) == 4
    image, label = data[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert image[2].mean() > 0.9 and image[0].mean() < 0.1  # "ant" is blue
    assert data[3][1] == 1 and data[3][0][0].mean() > 0.9  # "cat" is red


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="class sub-folders"):
        ImageFolder(tmp_path)


def test_load_image_resizes_shorter_side_then_crops_centre(tmp_path):
    # Left third black, right two thirds white: a centre crop of the resized image keeps both.
    array = np.zeros((60, 90, 3), dtype=np.uint8)
    array[:, 30:] = 255
    Image.fromarray(array).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png", size=20, resize_to=20)
    assert image.shape == (3, 20, 20)
    assert image[:, :, 0].max() < 0.05 and image[:, :, -1].min() > 0.95
    assert load_image(tmp_path / "x.png", size=None).shape == (3, 60, 90)
    with pytest.raises(ValueError, match="at least the crop size"):
        load_image(tmp_path / "x.png", size=20, resize_to=10)


@requires_imagenet_extra
@pytest.mark.imagenet
def test_labelled_imagenet_samples_found_without_importing_foolbox():
    import sys

    images, labels = labelled_samples("imagenet")
    assert images.shape == (20, 3, 224, 224)
    assert labels[0].item() == 243 and len(set(labels.tolist())) == 19
    assert "foolbox" not in sys.modules
    grey, _ = labelled_samples("fashionMNIST", size=None)
    assert grey.shape == (20, 3, 28, 28)
    with pytest.raises(ValueError, match="imagenet"):
        labelled_samples("svhn")
