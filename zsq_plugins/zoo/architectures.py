"""Constructors of the zoo's architectures, by model name (no weights)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from zsq_plugins.zoo.convnext import ConvNeXtFMNIST
from zsq_plugins.zoo.mobilenetv2 import MobileNetV2
from zsq_plugins.zoo.resnet import ResNet20
from zsq_plugins.zoo.vgg import VGGNoBN
from zsq_plugins.zoo.vit import ViTFMNIST

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet20_fmnist": ResNet20,
    "mobilenetv2_fmnist": MobileNetV2,
    "vgg_nobn_fmnist": VGGNoBN,
    "convnext_fmnist": ConvNeXtFMNIST,
    "vit_fmnist": ViTFMNIST,
}
