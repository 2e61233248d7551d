"""The evaluator: top-1 accuracy, and agreement and KL divergence with a reference model.

The one implementation used by the tests, the CLI and the benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

Batches = Iterable[torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    num_samples: int
    top1: float | None
    """Top-1 accuracy in percent; None when the data carry no labels."""
    agreement: float | None
    """Percent of samples whose top-1 class equals the reference model's; None without one."""
    kl: float | None
    """Mean KL(reference || model) of the softmax outputs, in nats; None without a reference."""

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def _as_batches(
    data: Dataset | DataLoader | Batches | torch.Tensor, batch_size: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, torch.Tensor):
        data = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    elif isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, tuple | list) and len(batch) >= 1:
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            raise TypeError(
                "evaluation data must yield tensors or (inputs, labels) pairs, got "
                f"{type(batch).__name__}"
            )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader | Batches | torch.Tensor,
    reference: nn.Module | None = None,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "evaluate",
) -> EvalResult:
    """Evaluates ``model`` on ``data`` (a Dataset, DataLoader, iterable of batches or tensor).

    Labels, when the batches carry them, give top-1 accuracy; a ``reference`` model (usually
    the FP32 original) gives top-1 agreement and mean KL divergence. Both models are put in
    eval mode and left there.
    """
    model.eval()
    if reference is not None:
        reference.eval()
    seen = correct = agree = labelled = 0
    kl_sum = 0.0
    bar = tqdm(desc=description, unit="img", disable=not progress, leave=False)
    try:
        for inputs, labels in _as_batches(data, batch_size):
            inputs = inputs.to(device)
            logits = model(inputs).float()
            if labels is not None:
                correct += (logits.argmax(1) == labels.to(device)).sum().item()
                labelled += len(labels)
            if reference is not None:
                ref_logits = reference(inputs).float()
                agree += (logits.argmax(1) == ref_logits.argmax(1)).sum().item()
                kl_sum += F.kl_div(
                    F.log_softmax(logits, 1),
                    F.log_softmax(ref_logits, 1),
                    reduction="sum",
                    log_target=True,
                ).item()
            seen += len(inputs)
            bar.update(len(inputs))
            if labelled:
                bar.set_postfix(top1=f"{100.0 * correct / labelled:.2f}")
    finally:
        bar.close()
    if seen == 0:
        raise ValueError("evaluation data yielded no samples")
    if labelled not in (0, seen):
        raise ValueError(f"only {labelled} of {seen} samples carried labels")
    return EvalResult(
        num_samples=seen,
        top1=100.0 * correct / seen if labelled else None,
        agreement=100.0 * agree / seen if reference is not None else None,
        kl=kl_sum / seen if reference is not None else None,
    )
