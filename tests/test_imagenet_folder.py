"""The labelled ImageNet folder (``<wnid>_*.JPEG``) on a small fake folder: no ImageNet image
is needed or read by these tests."""

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from zsq_plugins.compare import GridConfig, calibration_images, evaluation_data
from zsq_plugins.datasets import ImageNetSamples, imagenet_split, imagenet_wnids
from zsq_plugins.errors import DatasetNotFoundError

# Class indices of ILSVRC-2012 that any list of its wnids must give: first, last and two
# well-known ones in between.
KNOWN = {"n01440764": 0, "n01443537": 1, "n02123045": 281, "n15075141": 999}


def _write(folder, name, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / name)


@pytest.fixture
def folder(tmp_path):
    names = [
        "n01440764_tench.JPEG",
        "n01443537_goldfish.JPEG",
        "n02123045_tabby.JPEG",
        "n15075141_toilet_tissue.JPEG",
    ]
    for name in names:
        _write(tmp_path, name)
    _write(tmp_path, "n02124075_Egyptian_cat.JPEG", mode="L")  # grayscale, as some are
    (tmp_path / "README.txt").write_text("not an image: ignored")
    return tmp_path


def test_wnid_list_is_the_ilsvrc_class_order():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    for wnid, index in KNOWN.items():
        assert wnids.index(wnid) == index


def test_labels_are_ilsvrc_indices_and_images_are_cropped(folder):
    data = ImageNetSamples(folder, size=16)
    assert len(data) == 5
    labels = {path.name.split("_")[0]: label for path, label in data.samples}
    assert {w: labels[w] for w in KNOWN} == KNOWN
    assert labels["n02124075"] == 285
    image, _ = data[4]  # the grayscale one, converted to three channels
    assert image.shape == (3, 16, 16) and image.min() >= 0 and image.max() <= 1
    images, tensor_labels = data.tensors([0, 2])
    assert images.shape == (2, 3, 16, 16)
    assert tensor_labels.tolist() == [data.samples[0][1], data.samples[2][1]]


def test_folder_from_environment_variable(folder, monkeypatch):
    monkeypatch.setenv("ZSQ_IMAGENET_DIR", str(folder))
    assert len(ImageNetSamples(size=8)) == 5


def test_missing_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("ZSQ_IMAGENET_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="ZSQ_IMAGENET_DIR"):
        ImageNetSamples()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageNetSamples(tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        ImageNetSamples(tmp_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [("n99999999_made_up.JPEG", "not an ILSVRC-2012 class"), ("cat.jpg", "without a leading")],
)
def test_files_of_unknown_classes_are_refused(folder, name, message):
    _write(folder, name)
    with pytest.raises(DatasetNotFoundError, match=message):
        ImageNetSamples(folder)


def test_split_is_disjoint_fixed_and_chosen_by_file_name_digest(folder):
    data = ImageNetSamples(folder, size=8)
    pool, evaluation = imagenet_split(data, calibration=2)
    assert sorted(pool + evaluation) == list(range(5)) and not set(pool) & set(evaluation)
    digests = sorted(
        (hashlib.sha256(path.name.encode()).hexdigest(), i)
        for i, (path, _) in enumerate(data.samples)
    )
    assert pool == sorted(i for _, i in digests[:2])
    # Another image in the folder moves nothing unless its digest is among the smallest.
    _write(folder, "n01514668_cock.JPEG")
    grown = ImageNetSamples(folder, size=8)
    names = [grown.samples[i][0].name for i in imagenet_split(grown, calibration=2)[0]]
    new_digest = hashlib.sha256(b"n01514668_cock.JPEG").hexdigest()
    if new_digest > digests[1][0]:
        assert names == [data.samples[i][0].name for i in pool]
    with pytest.raises(ValueError, match="between 1 and"):
        imagenet_split(data, calibration=5)


def test_grid_calibrates_real_on_the_pool_and_evaluates_on_the_rest(folder, monkeypatch):
    monkeypatch.setenv("ZSQ_IMAGENET_DIR", str(folder))
    monkeypatch.setattr("zsq_plugins.datasets.imagenet.CALIBRATION_POOL", 2)
    config = GridConfig(
        models=["efficientnet_lite0"],
        toolkits=["fx"],
        data=["real"],
        specs=["W8A8"],
        num_samples=2,
        imagenet_folder=True,
    )
    pool = calibration_images("efficientnet_lite0", "real", config, folder, progress=False)
    batches = evaluation_data("efficientnet_lite0", None, imagenet_folder=True)
    evaluated = torch.cat([images for images, _ in batches])
    assert pool.shape == (2, 3, 224, 224) and evaluated.shape == (3, 3, 224, 224)
    # No calibration image is evaluated on.
    assert all(not torch.equal(p, e) for p in pool for e in evaluated)
    too_many = GridConfig(**{**config.to_dict(), "num_samples": 3})
    with pytest.raises(Exception, match="exceeds the ImageNet calibration pool"):
        calibration_images("efficientnet_lite0", "real", too_many, folder, progress=False)


def test_compare_takes_the_folder_on_the_command_line(folder, tmp_path, monkeypatch, capsys):
    from zsq_plugins.cli import main

    monkeypatch.delenv("ZSQ_IMAGENET_DIR", raising=False)
    config = tmp_path / "grid.toml"
    config.write_text(
        '[grid]\nmodels = ["efficientnet_lite0"]\ntoolkits = ["fx"]\ndata = ["real"]\n'
        'specs = ["W8A8"]\nnum_samples = 2\nimagenet_folder = true\n'
    )
    out = tmp_path / "out"
    missing = ["compare", str(config), "--out", str(out), "--imagenet-dir", str(tmp_path / "no")]
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            ["compare", str(config), "--out", str(out), "--dry-run", "--imagenet-dir", str(folder)]
        )
        == 0
    )
    assert os.environ["ZSQ_IMAGENET_DIR"] == str(folder.resolve())
