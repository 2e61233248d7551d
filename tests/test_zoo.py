import dataclasses
import shutil

import pytest
import torch
import torch.fx
from torch import nn

from tests.conftest import requires_fashion_mnist, requires_imagenet_extra
from zsq_plugins import evaluate, zoo
from zsq_plugins.datasets import fashion_mnist, labelled_samples
from zsq_plugins.errors import ChecksumMismatchError, UnknownPluginError
from zsq_plugins.zoo import registry as registry_module
from zsq_plugins.zoo.efficientnet_lite import _same_padding, convert_lukemelas_state_dict

FMNIST_MODELS = [
    "convnext_fmnist",
    "mobilenetv2_fmnist",
    "resnet20_fmnist",
    "vgg_nobn_fmnist",
    "vit_fmnist",
]
ACCURACY_FLOOR = {
    "resnet20_fmnist": 93.5,
    "mobilenetv2_fmnist": 92.5,
    "vgg_nobn_fmnist": 92.0,
    "convnext_fmnist": 92.5,
    "vit_fmnist": 91.5,
}


def test_registry_lists_models_and_filters():
    imagenet = ["efficientnet_lite0", "efficientnet_lite0_folded"]
    assert zoo.list_models() == sorted([*imagenet, *FMNIST_MODELS])
    assert zoo.list_models("*_fmnist") == FMNIST_MODELS


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(UnknownPluginError, match="resnet20_fmnist"):
        zoo.load("resnet56_cifar")


@pytest.mark.parametrize("name", FMNIST_MODELS)
def test_cards_carry_shape_dataset_checksum_and_accuracy(name):
    card = zoo.card(name)
    assert card.input_shape == (1, 28, 28)
    assert card.dataset == "fashion_mnist" and card.num_classes == 10
    assert card.sha256 is not None and len(card.sha256) == 64
    assert card.published_top1 >= ACCURACY_FLOOR[name]


@pytest.mark.parametrize("name", FMNIST_MODELS)
def test_models_take_unit_range_images_and_trace_with_fx(name):
    card = zoo.card(name)
    model = zoo.load(name)
    assert not model.training
    x = torch.rand(3, *card.input_shape)
    out = model(x)
    assert out.shape == (3, card.num_classes)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_bn == card.has_batchnorm


def test_corrupted_weights_are_refused(tmp_path, monkeypatch):
    for name in FMNIST_MODELS:
        shutil.copy(registry_module.WEIGHTS_DIR / f"{name}.safetensors", tmp_path)
    path = tmp_path / "resnet20_fmnist.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(registry_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ChecksumMismatchError, match="corrupted or was replaced"):
        zoo.load("resnet20_fmnist")
    assert zoo.load("vgg_nobn_fmnist") is not None  # untouched file still loads
    model = zoo.load("resnet20_fmnist", verify=False)  # a deliberate replacement is allowed
    assert isinstance(model, nn.Module)


def test_missing_checksum_is_refused(monkeypatch):
    monkeypatch.setattr(registry_module, "_manifest", lambda: {})
    with pytest.raises(ChecksumMismatchError, match="publish_zoo"):
        zoo.load("vgg_nobn_fmnist")


@requires_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name", FMNIST_MODELS)
def test_published_accuracy_is_reproduced(name):
    """The accuracy floor is the correctness check (the shipped weights are trained); the
    match with the card's number is a drift alarm: scripts/train_zoo.py measured that number
    with this code, so a mismatch says that evaluation or the weights changed."""
    result = evaluate(zoo.load(name), fashion_mnist("test"), progress=False)
    card = zoo.card(name)
    assert result.top1 == pytest.approx(card.published_top1, abs=0.05)
    assert result.top1 >= ACCURACY_FLOOR[name]


def test_same_padding_matches_tensorflow():
    assert _same_padding(3, 1, 224) == (1, 1)
    assert _same_padding(3, 2, 224) == (0, 1)  # TF puts the extra pixel at the end
    assert _same_padding(5, 2, 56) == (1, 2)
    assert _same_padding(5, 1, 7) == (2, 2)


def test_lukemelas_key_conversion_rejects_unknown_keys():
    converted = convert_lukemelas_state_dict({"_blocks.3._bn1.weight": torch.ones(1)})
    assert list(converted) == ["blocks.3.depthwise.bn.weight"]
    with pytest.raises(KeyError, match="_se_reduce"):
        convert_lukemelas_state_dict({"_blocks.0._se_reduce.weight": torch.ones(1)})


@requires_imagenet_extra
@pytest.mark.imagenet
@pytest.mark.slow
def test_efficientnet_lite0_classifies_imagenet_samples_and_exports():
    model = zoo.load("efficientnet_lite0")
    images, labels = labelled_samples("imagenet")
    result = evaluate(model, [(images, labels)], progress=False)
    assert round(result.top1 * 20 / 100) >= 17
    # Static padding: fx traces without any shape query, and torch.export succeeds.
    traced = torch.fx.symbolic_trace(model)
    assert not any(node.target in ("size", "shape") for node in traced.graph.nodes)
    assert any(isinstance(m, nn.ZeroPad2d) for m in model.modules())
    torch.testing.assert_close(traced(images[:2]), model(images[:2]))
    exported = torch.export.export(model, (images[:2],))  # batch size is specialized
    torch.testing.assert_close(exported.module()(images[2:4]), model(images[2:4]))


@requires_imagenet_extra
def test_a_derived_card_is_its_base_in_another_form():
    """efficientnet_lite0_folded: the base's checked weights with every BN folded away."""
    base, folded = zoo.load("efficientnet_lite0"), zoo.load("efficientnet_lite0_folded")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert not zoo.card("efficientnet_lite0_folded").has_batchnorm
    assert zoo.card("efficientnet_lite0_folded").sha256 == zoo.card("efficientnet_lite0").sha256
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), base(x), rtol=1e-4, atol=1e-4)
    untrained = zoo.load("efficientnet_lite0_folded", pretrained=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in untrained.modules())


def test_a_derived_card_needs_its_base_and_transform():
    folded, base = zoo.card("efficientnet_lite0_folded"), zoo.card("efficientnet_lite0")
    assert (folded.sha256, folded.published_top1) == (base.sha256, base.published_top1)
    assert folded.sha256 is not None and folded.published_top1 is not None
    card = zoo.card("vgg_nobn_fmnist")
    with pytest.raises(ValueError, match="needs both base and transform"):
        dataclasses.replace(card, base="resnet20_fmnist")
