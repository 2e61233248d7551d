"""A small vision transformer (Dosovitskiy et al., 2021) for Fashion-MNIST: no BatchNorm, the
BN-free model of today's vision.

Pre-norm encoder layers (LayerNorm, multi-head self-attention, LayerNorm, GELU MLP), a class
token, learned position embeddings and 4x4 patches (49 tokens), embedded by a small
convolutional stem ("early convolutions", Xiao et al. 2021: a 3x3 stride-2 convolution,
LayerNorm over channels and GELU, then 2x2 patches of its output), which lets a ViT this small
learn Fashion-MNIST in minutes; ``stem_channels=0`` gives ViT's plain linear embedding of 4x4
patches. The
attention is written out (query, key and value as separate linear layers, as Hugging Face's
ViT has them; scaled q k^T, softmax, the weighted sum of v, an output projection) rather than
``nn.MultiheadAttention``, so that torch.fx traces into it and every toolkit sees its linear
layers and matrix products: a fused module is a leaf that toolkits leave in float.
"""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.zoo._layers import Normalize
from zsq_plugins.zoo.convnext import ChannelLayerNorm
from zsq_plugins.zoo.resnet import FASHION_MNIST_MEAN, FASHION_MNIST_STD


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of the {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) -> (N, heads, L, head_dim)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.query(x)) * self.scale
        k, v = self.split_heads(self.key(x)), self.split_heads(self.value(x))
        weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViTFMNIST(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch: int = 4,
        width: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: int = 2,
        stem_channels: int = 32,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        self.input_shape = (in_channels, image_size, image_size)
        tokens = (image_size // patch) ** 2
        self.stem: nn.Module = nn.Identity()
        if stem_channels:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, stride=2, padding=1),
                ChannelLayerNorm(stem_channels),
                nn.GELU(),
            )
        step = patch // 2 if stem_channels else patch
        self.patch_embed = nn.Conv2d(stem_channels or in_channels, width, step, stride=step)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.layers = nn.Sequential(*(EncoderLayer(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides biases and norms (as timm's)."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.stem(self.normalize(x))).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.layers(tokens))[:, 0])
