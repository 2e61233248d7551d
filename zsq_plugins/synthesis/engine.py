"""The synthesis engine: one loop for every preset (parameterization x objective x augmentation)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from zsq_plugins.errors import ZSQError
from zsq_plugins.synthesis.augment import augment
from zsq_plugins.synthesis.config import Parameterization, StatisticsSource, SynthesisConfig
from zsq_plugins.synthesis.discrepancy import (
    layer_inputs,
    matching_layers,
    output_discrepancy,
    relation_discrepancy,
)
from zsq_plugins.synthesis.hooks import (
    StatisticsCapture,
    StatisticsTarget,
    batchnorm_targets,
    capture_input,
    frozen,
    last_linear,
    swing_convolution,
)
from zsq_plugins.synthesis.model_info import InputDomain, batchnorm_layers
from zsq_plugins.synthesis.objectives import plan_batch, total_objective
from zsq_plugins.synthesis.parameterization import make_source
from zsq_plugins.synthesis.weight_stats import weight_statistics_targets


def statistics_targets(
    model: nn.Module, config: SynthesisConfig, input_shape: tuple[int, ...]
) -> list[StatisticsTarget]:
    """The statistics the objective matches: BN running statistics, or weight-derived ones."""
    if not config.uses_statistics:
        return []
    if config.statistics is StatisticsSource.WEIGHTS:
        return weight_statistics_targets(model, input_shape)
    return batchnorm_targets(batchnorm_layers(model))


@contextlib.contextmanager
def _opponent(opponent: nn.Module | None) -> Iterator[nn.Module | None]:
    if opponent is None:
        yield None
        return
    with frozen(opponent):  # a fixed player while the images move
        yield opponent


class SynthesisDiverged(ZSQError):
    """The objective became NaN or Inf."""


def batch_seed(seed: int, index: int) -> int:
    """An independent, reproducible seed for batch ``index`` of a run seeded with ``seed``.

    Batches depend only on (seed, index), never on which process or which resumed run
    generates them.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@dataclasses.dataclass(frozen=True)
class BatchResult:
    images: torch.Tensor
    """Images in the model's input space, on CPU."""
    initial_loss: float | None
    final_loss: float | None
    terms: dict[str, float]
    seconds: float


class SynthesisEngine:
    def __init__(
        self,
        model: nn.Module,
        config: SynthesisConfig,
        input_shape: tuple[int, ...],
        domain: InputDomain,
        num_classes: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        opponent: nn.Module | None = None,
    ) -> None:
        if config.needs_opponent and opponent is None:
            raise ValueError(
                "this configuration maximizes the discrepancy with a quantized model (ZAQ) "
                "and needs one: pass opponent=<the toolkit's quantized model>, or let "
                "apply(model, toolkit, spec, data='adversarial') play it"
            )
        self.model = model
        self.opponent = opponent if config.needs_opponent else None
        self.relation_layers = (
            matching_layers(model, opponent)
            if opponent is not None and config.relation_weight > 0
            else []
        )
        self.config = config
        self.input_shape = input_shape
        self.domain = domain
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype
        self.targets = statistics_targets(model, config, input_shape)
        self.classifier = last_linear(model) if config.decorrelation_weight > 0 else None

    def run_batch(self, size: int, seed: int, bar: tqdm | None = None) -> BatchResult:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        if self.config.parameterization is Parameterization.NOISE:
            z = torch.randn(size, *self.input_shape, generator=generator, dtype=self.dtype)
            if bar is not None:
                bar.update(1)
            return BatchResult(self.domain.to_input(z), None, None, {}, 0.0)
        source = make_source(
            self.config, self.domain, size, self.input_shape, generator, self.device, self.dtype
        )
        plan = plan_batch(size, len(self.targets), self.num_classes, generator)
        initial_loss = final_loss = math.nan
        terms: dict[str, float] = {}
        with (
            frozen(self.model),
            StatisticsCapture(self.targets) as capture,
            capture_input(self.classifier) as features,
            swing_convolution(self.model, self.config.swing, generator),
            _opponent(self.opponent) as opponent,
            layer_inputs(self.model, self.relation_layers) as fp_features,
            layer_inputs(
                opponent if opponent is not None else self.model,
                self.relation_layers if opponent is not None else [],
            ) as opponent_features,
        ):
            targets = capture.targets
            for iteration in range(self.config.iterations):
                source.zero_grad()
                z = source.normalized()
                x = augment(self.domain.to_input(z), self.config, generator)
                logits = self.model(x)
                discrepancies = None
                if opponent is not None:
                    discrepancies = {
                        "discrepancy": output_discrepancy(logits, opponent(x)),
                        "relation": relation_discrepancy(fp_features, opponent_features),
                    }
                loss, terms = total_objective(
                    self.config,
                    capture.collected() if self.targets else [],
                    targets,
                    z,
                    logits,
                    features[0] if features else None,
                    plan,
                    discrepancies,
                )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise SynthesisDiverged(
                        f"the synthesis objective became {value} at step {iteration + 1}; "
                        f"terms: {terms}. Nothing was written for this batch. Lower lr "
                        f"(now {self.config.lr}) or generator_lr, and check the model."
                    )
                if iteration == 0:
                    initial_loss = value
                final_loss = value
                loss.backward()
                source.step(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        with torch.no_grad():
            images = self.domain.to_input(source.normalized()).detach().cpu()
        return BatchResult(images, initial_loss, final_loss, terms, time.perf_counter() - started)
