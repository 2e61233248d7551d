"""What the engine optimizes: raw pixels, or a generator with learnable latents.

Both produce images in the model's normalized input space (see model_info.InputDomain).
"""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.synthesis.config import Parameterization, SynthesisConfig
from zsq_plugins.synthesis.model_info import InputDomain


class LatentGenerator(nn.Module):
    """Genie's generator (after GDFQ): latent -> linear -> two upsample+conv stages -> tanh,
    then a BatchNorm without affine parameters that standardizes each output channel.

    ``tanh=False`` drops the tanh, for inputs that are bounded by a clamp instead: a saturated
    tanh, once standardized, is nearly two-valued and cannot reach the top of the range.
    """

    def __init__(
        self,
        latent_dim: int,
        shape: tuple[int, ...],
        channels: tuple[int, int] = (128, 64),
        tanh: bool = True,
    ) -> None:
        super().__init__()
        out_channels, height, width = shape
        wide, narrow = channels
        self.start = (wide, max(1, height // 4), max(1, width // 4))
        self.linear = nn.Linear(latent_dim, wide * self.start[1] * self.start[2])
        self.body = nn.Sequential(
            nn.BatchNorm2d(wide),
            nn.Upsample(size=(max(1, height // 2), max(1, width // 2))),
            nn.Conv2d(wide, narrow, 3, padding=1),
            nn.BatchNorm2d(narrow),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(height, width)),
            nn.Conv2d(narrow, out_channels, 3, padding=1),
            nn.Tanh() if tanh else nn.Identity(),
            nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(latents).view(-1, *self.start))


def generator_macs(latent_dim: int, shape: tuple[int, ...], channels: tuple[int, int]) -> int:
    """Forward multiply-accumulates of ``LatentGenerator`` per image: at 224 px its two convs
    cost three times an EfficientNet-Lite0, so a budget must count them."""
    out_channels, height, width = shape
    wide, narrow = channels
    linear = latent_dim * wide * max(1, height // 4) * max(1, width // 4)
    middle = max(1, height // 2) * max(1, width // 2) * narrow * wide * 9
    return linear + middle + height * width * out_channels * narrow * 9


class ImageSource:
    """Base: holds the optimizers and schedules of one batch's parameters."""

    def __init__(self, config: SynthesisConfig, domain: InputDomain) -> None:
        self.config = config
        self.domain = domain
        self.optimizers: list[torch.optim.Optimizer] = []
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self.decay: torch.optim.lr_scheduler.ExponentialLR | None = None

    def normalized(self) -> torch.Tensor:
        raise NotImplementedError

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self, loss: float) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
        if self.plateau is not None:
            self.plateau.step(loss)
        if self.decay is not None:
            self.decay.step()

    def _plateau(self, optimizer: torch.optim.Optimizer) -> None:
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.1, patience=self.config.plateau_patience, min_lr=self.config.min_lr
        )


class PixelSource(ImageSource):
    def __init__(
        self,
        config: SynthesisConfig,
        domain: InputDomain,
        size: int,
        shape: tuple[int, ...],
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(config, domain)
        init = torch.randn(size, *shape, generator=generator, dtype=dtype).to(device)
        if config.clamp_to_input_range:
            init = domain.clamp_normalized(init)
        self.pixels = init.requires_grad_()
        optimizer = torch.optim.Adam([self.pixels], lr=config.lr)
        self.optimizers = [optimizer]
        self._plateau(optimizer)

    def normalized(self) -> torch.Tensor:
        return self.pixels

    def step(self, loss: float) -> None:
        super().step(loss)
        if self.config.clamp_to_input_range:  # projected gradient: stay in the valid range
            with torch.no_grad():
                self.pixels.copy_(self.domain.clamp_normalized(self.pixels))


class GeneratorSource(ImageSource):
    def __init__(
        self,
        config: SynthesisConfig,
        domain: InputDomain,
        size: int,
        shape: tuple[int, ...],
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(config, domain)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the network's own init draws from the global RNG
            self.net = LatentGenerator(
                config.latent_dim,
                shape,
                config.generator_channels,
                config.generator_tanh,
            )
        self.net.to(device=device, dtype=dtype).train()
        latents = torch.randn(size, config.latent_dim, generator=generator, dtype=dtype)
        self.latents = latents.to(device).requires_grad_()
        latent_optimizer = torch.optim.Adam([self.latents], lr=config.lr)
        net_optimizer = torch.optim.Adam(self.net.parameters(), lr=config.generator_lr)
        self.optimizers = [latent_optimizer, net_optimizer]
        self._plateau(latent_optimizer)
        # Genie decays the generator's lr by 0.95 every 100 steps; the same decay, per step,
        # so that the schedule does not depend on a logging interval.
        self.decay = torch.optim.lr_scheduler.ExponentialLR(
            net_optimizer, gamma=config.generator_lr_decay ** (1 / 100)
        )

    def normalized(self) -> torch.Tensor:
        z = self.net(self.latents)
        return self.domain.clamp_normalized(z) if self.config.clamp_to_input_range else z


def make_source(
    config: SynthesisConfig,
    domain: InputDomain,
    size: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> ImageSource:
    if config.parameterization is Parameterization.PIXELS:
        return PixelSource(config, domain, size, shape, generator, device, dtype)
    if config.parameterization is Parameterization.GENERATOR:
        return GeneratorSource(config, domain, size, shape, generator, device, dtype)
    raise ValueError(f"{config.parameterization.value!r} has no optimized parameters")
