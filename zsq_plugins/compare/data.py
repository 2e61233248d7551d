"""What a grid's cells calibrate on and are evaluated on: real or synthetic calibration sets
(cached per model and preset) and each model's labelled evaluation data."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq_plugins.compare.grid import REAL, Cell, GridConfig
from zsq_plugins.errors import ZSQError

IMAGENET_EVAL_BATCH = 50
"""Images per evaluation batch of a 224 px model: bounded activation memory."""


def evaluation_data(
    model_name: str, test_samples: int | None, imagenet_folder: bool = False
) -> Any:
    """The model's labelled evaluation data (Fashion-MNIST test set; for ImageNet models the
    evaluation part of the ImageNet folder with ``imagenet_folder``, else the 20 foolbox
    images), optionally its first ``test_samples`` items."""
    from zsq_plugins.datasets import fashion_mnist, labelled_samples
    from zsq_plugins.zoo import card

    model_card = card(model_name)
    if model_card.dataset == "fashion_mnist":
        test = fashion_mnist("test")
        if test_samples is not None and test_samples < len(test):
            test = torch.utils.data.Subset(test, range(test_samples))
        return test
    if model_card.dataset == "imagenet":
        if imagenet_folder:
            images, labels = _imagenet_part(model_card.input_shape[-1], calibration=False)
        else:
            images, labels = labelled_samples("imagenet", size=model_card.input_shape[-1])
        images, labels = images[:test_samples], labels[:test_samples]
        return [
            (images[i : i + IMAGENET_EVAL_BATCH], labels[i : i + IMAGENET_EVAL_BATCH])
            for i in range(0, len(images), IMAGENET_EVAL_BATCH)
        ]
    raise ValueError(f"no evaluation data known for dataset {model_card.dataset!r}")


def _imagenet_part(size: int, calibration: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration pool or the evaluation part of the ImageNet folder, decoded."""
    from zsq_plugins.datasets.imagenet import ImageNetSamples, imagenet_split

    dataset = ImageNetSamples(size=size)
    pool, evaluation = imagenet_split(dataset)
    return dataset.tensors(pool if calibration else evaluation)


def synthetic_set_folder(
    root: Path,
    model_name: str,
    preset: str,
    budget: str,
    num_samples: int,
    seed: int,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Where a synthetic set is cached under ``root``: one folder per model and exact
    configuration (its name carries a hash of the resolved SynthesisConfig), so a changed
    preset makes a new set instead of tripping over the old one."""
    from zsq_plugins.synthesis.presets import get_preset

    synthesis = get_preset(preset).config(budget).replace(**(overrides or {}))
    digest = hashlib.sha256(synthesis.to_json().encode()).hexdigest()[:10]
    return root / model_name / f"{preset}-{budget}-n{num_samples}-seed{seed}-{digest}"


def plays_toolkit(source: str, config: GridConfig) -> bool:
    """Whether the data source is made against each toolkit's quantized model (ZAQ-style
    ``adversarial``), so that its images belong to one (toolkit, spec) cell, not a model."""
    if source == REAL or source in config.external_data:
        return False
    from zsq_plugins.synthesis.presets import get_preset

    preset = get_preset(source).config(config.synthesis_budget).replace(**config.synthesis)
    return preset.needs_opponent


def calibration_images(
    model_name: str,
    source: str,
    config: GridConfig,
    data_dir: Path,
    progress: bool,
    cell: Cell | None = None,
) -> torch.Tensor:
    """Real training images, or a synthetic set (cached under ``data_dir``, shared by every
    cell of the same model and preset; an adversarial set by the cells of one toolkit and
    spec, ``cell``'s)."""
    from zsq_plugins import zoo
    from zsq_plugins.synthesis import synthesize
    from zsq_plugins.synthesis.adversarial import adversarial_synthesize

    user = config.user_model(model_name)
    if source in config.external_data:
        shape = config.input_shape(model_name)
        return external_images(config.external_data[source], shape, config.num_samples)
    if source == REAL:
        dataset = None if user is not None else zoo.card(model_name).dataset
        if dataset == "imagenet" and config.imagenet_folder:
            pool, _ = _imagenet_part(zoo.card(model_name).input_shape[-1], calibration=True)
            if config.num_samples > len(pool):
                raise ZSQError(
                    f"num_samples {config.num_samples} exceeds the ImageNet calibration pool "
                    f"({len(pool)} images)"
                )
            return pool[: config.num_samples]
        if dataset != "fashion_mnist":
            raise ZSQError(
                f"no real training images are available offline for {model_name}; use "
                "generator presets only for it"
            )
        from zsq_plugins.datasets import calibration_subset

        return calibration_subset(config.num_samples, seed=config.seed)
    folder = synthetic_set_folder(
        data_dir,
        model_name,
        source,
        config.synthesis_budget,
        config.num_samples,
        config.seed,
        config.synthesis,
    )
    synthesis = {**config.synthesis, **({"input_spec": user.input_spec} if user else {})}
    if plays_toolkit(source, config):
        if cell is None:
            raise ValueError(f"{source!r} data are made per toolkit and spec: pass the cell")
        spec = config.quant_spec(cell.spec)
        digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:10]
        data = adversarial_synthesize(
            config.load_model(model_name),
            cell.toolkit,
            spec,
            config.num_samples,
            source,
            config.seed,
            budget=config.synthesis_budget,
            cache_dir=folder / f"{cell.toolkit}-{cell.spec}-{digest}",
            progress=progress,
            **synthesis,
        )
        return data.images
    data = synthesize(
        config.load_model(model_name),
        config.num_samples,
        source,
        config.seed,
        budget=config.synthesis_budget,
        cache_dir=folder,
        progress=progress,
        **synthesis,
    )
    return data.images


def external_images(path: str, input_shape: tuple[int, ...], num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` images of an external calibration set: a safetensors file
    whose ``images`` tensor (N x ``input_shape``, floating point) is in the model's input
    space."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ZSQError(
            f"external calibration set {path} does not exist: make it first, or correct "
            "[grid.external_data]"
        )
    try:
        tensors = load_file(file)
    except SafetensorError as error:
        raise ZSQError(f"{path} is not a safetensors file ({error})") from None
    images = tensors.get("images")
    if images is None:
        raise ZSQError(f"{path} holds no 'images' tensor (it holds {sorted(tensors)})")
    if not images.is_floating_point() or tuple(images.shape[1:]) != input_shape:
        raise ZSQError(
            f"{path}: images of {images.dtype} {tuple(images.shape)}; the model takes floating "
            f"point N x {input_shape}, in its input space"
        )
    if len(images) < num_samples:
        raise ZSQError(
            f"{path} holds {len(images)} images and the grid calibrates on {num_samples}: "
            "lower num_samples or make more"
        )
    return images[:num_samples].float()


def external_digest(path: str) -> str | None:
    """SHA-256 of an external calibration set (None: the file is not here), computed once per
    file version: a cell records it, and one made from other images is stale."""
    file = Path(path)
    if not file.is_file():
        return None
    stat = file.stat()
    return _digest(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    from zsq_plugins.checksums import sha256_of

    return sha256_of(path)


def fp32_top1(model: nn.Module, test: Any) -> float | None:
    """The FP32 model's top-1 on exactly the grid's evaluation images (None: unlabelled)."""
    from zsq_plugins import evaluate

    return evaluate(model, test, progress=False).top1
