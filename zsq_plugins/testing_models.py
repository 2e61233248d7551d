"""Tiny models for the adapter conformance template (zsq_plugins.testing) and the tests: small
enough for any unit test, each holding the patterns an adapter must handle."""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.layers import Normalize
from zsq_plugins.zoo.vit import ViTFMNIST


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU x2 + linear on 1x8x8 inputs: small enough for any unit test."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class TinyReLU6Net(nn.Module):
    """Conv-BN-ReLU6, a residual add and a linear head: the patterns adapters must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.25,))
        self.stem = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        )
        self.body = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = x + self.body(x)
        return self.fc(self.flatten(self.pool(x)))


def tiny_model(kind: str) -> nn.Module:
    """``relu6``: TinyReLU6Net; ``relu``: input normalization + TinyConvNet. BatchNorm
    statistics are randomized so that folding them matters."""
    torch.manual_seed(0)
    if kind == "relu6":
        model: nn.Module = TinyReLU6Net()
    else:
        model = nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


class TinyConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels last, LayerNorm, GELU MLP, layer scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1, self.act = nn.Linear(channels, 4 * channels), nn.GELU()
        self.pw2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(self.act(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """A BN-free ConvNeXt-style CNN on 1 x 32 x 32 inputs (random weights, seeded)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, channels, 4, stride=4)
        self.blocks = nn.Sequential(TinyConvNeXtBlock(channels), TinyConvNeXtBlock(channels))
        self.norm, self.head = nn.LayerNorm(channels), nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


class TinyViT(nn.Module):
    """A vision transformer on 1 x 16 x 16 inputs: 4 x 4 patches, a class token, position
    embeddings and two pre-norm ``nn.TransformerEncoder`` layers (random weights, seeded)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(1, width, 4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 17, width))
        layer = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


def tiny_attention_vit() -> nn.Module:
    """The zoo's ViT at 1 x 16 x 16 with two layers of width 32 and no stem: attention written
    out with four heads (separate query/key/value linears, q k^T, softmax, the product with v),
    which torch.fx traces into; default-initialized (seeded) so that every layer matters."""
    torch.manual_seed(0)
    model = ViTFMNIST(image_size=16, width=32, depth=2, heads=4, stem_channels=0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return model.eval()
