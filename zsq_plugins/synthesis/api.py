"""``synthesize`` and ``calibration_loader``: the public face of the synthesis engine."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsq_plugins.budgets import auto_budget, model_macs
from zsq_plugins.configio import Budget
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.input_spec import InputSpec
from zsq_plugins.synthesis.artifact import FORMAT, ShardStore, SyntheticDataset
from zsq_plugins.synthesis.config import Parameterization
from zsq_plugins.synthesis.distributed import barrier, join_from_environment, rank_device
from zsq_plugins.synthesis.engine import SynthesisEngine, batch_seed, batch_sizes
from zsq_plugins.synthesis.hooks import frozen
from zsq_plugins.synthesis.model_info import (
    batchnorm_layers,
    check_finite_weights,
    check_input_shape,
    infer_input_shape,
    input_domain,
    model_fingerprint,
)
from zsq_plugins.synthesis.parameterization import generator_macs
from zsq_plugins.synthesis.presets import get_preset, presets_without_batchnorm

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32
"""Images per batch of ``calibration_loader``, and of every toolkit calibration it feeds."""


class _MemoryStore:
    """The in-memory counterpart of ShardStore, for runs without a cache folder."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity
        self.shards: dict[int, dict[str, Any]] = {}
        self.images: dict[int, torch.Tensor] = {}

    def finished(self) -> set[int]:
        return set(self.shards)

    def write_shard(self, index: int, images: torch.Tensor, record: dict[str, Any]) -> None:
        self.images[index] = images
        self.shards[index] = {"index": index, "size": len(images), **record}

    def complete(self, extra: dict[str, Any]) -> None:
        self.extra = extra


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def synthesize(
    model: nn.Module,
    num_samples: int,
    preset: str = "genie",
    seed: int = 0,
    *,
    budget: Budget | str = Budget.AUTO,
    input_shape: Sequence[int] | None = None,
    input_spec: InputSpec | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    opponent: nn.Module | None = None,
    **overrides: Any,
) -> SyntheticDataset:
    """Generates ``num_samples`` calibration images for ``model`` without any real data.

    ``preset`` names a generator (``noise``, ``zeroq``, ``dsg``, ``genie``, or one added by
    a plugin); ``budget`` picks its ``paper`` or ``cpu`` iteration budget, or ``auto`` (the
    default): ``cpu`` scaled down for models costlier per image than the Fashion-MNIST zoo
    models (zsq_plugins.budgets); ``overrides`` set any SynthesisConfig field
    (``iterations=50``, ``batch_size=64``...) and win over the budget. Images are in the
    model's input space (``[0, 1]`` for the zoo's models). ``input_shape`` (C, H, W) is read
    from ``model.input_shape`` when the model declares it. ``input_spec`` (an ``InputSpec``)
    says what a model that does not declare it expects: its input shape, a normalization
    outside it (the images are then returned normalized) and the valid pixel range, which the
    presets that clamp keep every pixel inside. A model with no known bounds gets unbounded
    images, with a warning in the log saying how to give them.

    With ``cache_dir``, each finished batch is written there at once as a safetensors shard
    plus manifest; a run interrupted and started again reuses the finished batches, and a
    completed set is loaded instead of regenerated. The same seed gives the same images.

    Under ``torchrun --nproc_per_node=N`` each process generates a disjoint share of the
    batches into ``cache_dir`` (required then), rank 0 writes the merged manifest, and every
    rank returns the whole set, identical to a single-process run with the same seed.

    ``opponent`` is the quantized model that a ZAQ-style preset (``adversarial``) plays
    against; ``apply(model, toolkit, spec, data="adversarial")`` alternates such rounds with
    the toolkit's calibration (synthesis/adversarial.py).
    """
    _positive_int("num_samples", num_samples)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    generator_preset = get_preset(preset)
    config = generator_preset.config(budget).replace(**overrides)
    check_finite_weights(model)
    if config.uses_batchnorm and not batchnorm_layers(model):
        raise UnsupportedModelError(
            f"preset {preset!r} inverts BatchNorm statistics, but {type(model).__name__} has no "
            "BatchNorm layer with running statistics (was BatchNorm folded?). Presets that need "
            f"no BatchNorm: {', '.join(presets_without_batchnorm())}."
        )
    if config.needs_opponent and opponent is None:
        raise ValueError(
            f"preset {preset!r} maximizes the discrepancy between the model and a quantized "
            "copy of it (ZAQ), so it needs that copy: call apply(model, toolkit, spec, "
            f"data={preset!r}), which plays the toolkit's quantized model, or pass "
            "opponent=<a quantized model>"
        )
    if input_spec is not None:
        if input_mean is not None or input_std is not None:
            raise ValueError("give input_spec or input_mean/input_std, not both")
        if input_shape is not None and tuple(input_shape) != input_spec.shape:
            raise ValueError(
                f"input_shape {tuple(input_shape)} differs from input_spec.shape "
                f"{input_spec.shape}; give one of them"
            )
        input_shape = input_spec.shape
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    if shape is None:
        raise ValueError(
            f"cannot infer the input shape of {type(model).__name__}; pass input_shape=(C, H, W)"
        )
    for size in shape:
        _positive_int("each input_shape entry", size)
    device = _resolve_device(model, device)
    ranks = join_from_environment(device)
    device = rank_device(device, ranks)
    if ranks.is_distributed and cache_dir is None:
        raise ValueError(
            "synthesize under torchrun needs cache_dir=<a folder every rank can write>: the "
            "ranks exchange their batches through it"
        )
    if device != _resolve_device(model, None):
        model = copy.deepcopy(model).to(device)
    domain = input_domain(model, shape[0], input_mean, input_std, input_spec)
    if domain.low is None and config.clamp_to_input_range:
        log.warning(
            "%s: the valid range of the model's inputs is unknown, so %r images are unbounded "
            "(outliers stretch min-max ranges). Give input_spec=InputSpec(shape, mean, std, "
            "low, high) (zsq: --pixel-range LOW,HIGH).",
            type(model).__name__,
            preset,
        )
    with frozen(model):  # eval mode for the check, the caller's mode restored afterwards
        num_classes = check_input_shape(model, shape, device)
    optimized = config.parameterization is not Parameterization.NOISE
    if Budget.parse(budget) is Budget.AUTO and optimized:
        source_macs = 0
        if config.parameterization is Parameterization.GENERATOR:
            source_macs = generator_macs(config.latent_dim, shape, config.generator_channels)
        config = auto_budget(model_macs(model, shape)).scale_synthesis(
            config, num_samples, fixed=overrides, source_macs=source_macs
        )
    sizes = batch_sizes(num_samples, config.batch_size)
    identity = {
        "format": FORMAT,
        "model_fingerprint": model_fingerprint(model),
        "preset": preset,
        "budget": Budget.parse(budget).value,
        "config": config.to_dict(),
        "seed": seed,
        "num_samples": num_samples,
        "batch_sizes": sizes,
        "input_shape": list(shape),
        "input_domain": {  # as JSON holds it (tuples as lists), so that a stored one compares
            "mean": list(domain.mean),
            "std": list(domain.std),
            "low": list(domain.low) if isinstance(domain.low, tuple) else domain.low,
            "high": list(domain.high) if isinstance(domain.high, tuple) else domain.high,
        },
        "dtype": str(dtype),
    }
    if config.needs_opponent and opponent is not None:
        identity["opponent_fingerprint"] = model_fingerprint(opponent)
    store: ShardStore | _MemoryStore
    if cache_dir is not None:
        store = ShardStore(cache_dir, identity, ranks.rank, ranks.world)
    else:
        store = _MemoryStore(identity)
    finished = store.finished()
    pending = [i for i in range(len(sizes)) if i not in finished and ranks.owns(i)]
    if len(pending) < len(sizes):
        log.info("reusing %d finished batch(es) from %s", len(sizes) - len(pending), cache_dir)
    engine = SynthesisEngine(
        model, config, shape, domain, num_classes, device, dtype, opponent=opponent
    )
    steps = 1 if config.parameterization is Parameterization.NOISE else config.iterations
    started = time.perf_counter()
    description = f"synthesize {preset}" + (f" [rank {ranks.rank}]" if ranks.is_distributed else "")
    with tqdm(
        total=steps * len(pending), desc=description, unit="step", disable=not progress
    ) as bar:
        for index in pending:
            result = engine.run_batch(sizes[index], batch_seed(seed, index), bar)
            store.write_shard(
                index,
                result.images,
                {
                    "initial_loss": result.initial_loss,
                    "final_loss": result.final_loss,
                    "terms": result.terms,
                    "seconds": round(result.seconds, 3),
                    # What the seconds were measured with: a cached set's cost is read later.
                    "torch_threads": torch.get_num_threads(),
                    "device": str(device),
                },
            )
            log.debug("batch %d: loss %s -> %s", index, result.initial_loss, result.final_loss)
    extra = {"generation_seconds": round(time.perf_counter() - started, 3)}
    if isinstance(store, ShardStore) and ranks.is_distributed:
        extra["world_size"] = ranks.world
        barrier(ranks)  # every rank's shards are written
        if ranks.rank == 0:
            store.merge(extra)
        barrier(ranks)  # the merged manifest is written
    else:
        store.complete(extra)
    if isinstance(store, ShardStore):
        return SyntheticDataset.load(store.root)
    images = torch.cat([store.images[i] for i in range(len(sizes))])
    manifest = {
        "identity": identity,
        "complete": True,
        "shards": [store.shards[i] for i in range(len(sizes))],
        **store.extra,
    }
    return SyntheticDataset(images, manifest)


class _WithDummyTargets(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, images: Dataset[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], 0


def calibration_loader(
    source: nn.Module | Dataset[torch.Tensor] | torch.Tensor,
    num_samples: int = 1024,
    *,
    batch_size: int = CALIBRATION_BATCH,
    with_targets: bool = False,
    shuffle: bool = False,
    **synthesize_kwargs: Any,
) -> DataLoader:
    """A DataLoader of calibration batches that any toolkit's calibration loop accepts.

    ``source`` is a model (data are synthesized for it with ``synthesize_kwargs``), a
    SyntheticDataset or any dataset of images, or a tensor (N, C, H, W). Batches are input
    tensors, or ``(input, 0)`` pairs with ``with_targets=True`` for loops that unpack targets.
    ``batch_size`` is the loader's; to set the generation batch size, call ``synthesize``
    and pass its result.
    """
    _positive_int("batch_size", batch_size)
    if isinstance(source, nn.Module):
        dataset: Dataset[Any] = synthesize(source, num_samples, **synthesize_kwargs)
    elif isinstance(source, torch.Tensor):
        dataset = torch.utils.data.TensorDataset(source)
        dataset = _Unwrap(dataset)
    else:
        if synthesize_kwargs:
            raise TypeError(f"options {sorted(synthesize_kwargs)} apply only to a model source")
        dataset = source
    if with_targets:
        dataset = _WithDummyTargets(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class _Unwrap(Dataset[torch.Tensor]):
    def __init__(self, dataset: torch.utils.data.TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]
