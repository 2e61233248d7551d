"""Trains a Fashion-MNIST reference model of the zoo and writes its weights as safetensors.

Recipe: one-cycle learning rate (15% warm-up), batch 128, label smoothing 0.1, augmentation by
random 2-pixel translation (padding + crop) and horizontal flip, no weight decay on biases,
norms or the parameters a model lists in ``no_weight_decay()``. The CNNs with BatchNorm or none
train with SGD (Nesterov momentum 0.9, weight decay 5e-4); the LayerNorm models (ConvNeXt, ViT)
with AdamW and weight decay 0.05, as their papers train them. Deterministic for a seed and
thread count. Tensors in channels_last memory format (a CPU speed-up only).

    python scripts/train_zoo.py resnet20_fmnist --epochs 20 --out zsq_plugins/zoo/weights

Writes ``<name>.safetensors`` and ``<name>.train.json`` (recipe, per-epoch log, test accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from zsq_plugins.datasets.fmnist import load_arrays
from zsq_plugins.zoo.architectures import ARCHITECTURES

log = logging.getLogger("train_zoo")


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str
    """"sgd" (Nesterov momentum 0.9) or "adamw" (betas 0.9, 0.999)."""
    lr: float
    weight_decay: float


RECIPES = {
    "resnet20_fmnist": Recipe("sgd", 0.2, 5e-4),
    "mobilenetv2_fmnist": Recipe("sgd", 0.2, 5e-4),
    "vgg_nobn_fmnist": Recipe("sgd", 0.05, 5e-4),
    "convnext_fmnist": Recipe("adamw", 4e-3, 0.05),
    "vit_fmnist": Recipe("adamw", 2e-3, 0.05),
}
WARMUP_FRACTION = 0.15
"""One-cycle schedule: the share of the steps spent warming up to the peak learning rate."""
LABEL_SMOOTHING = 0.1
SHIFT_PIXELS = 2
"""Augmentation: random translation by up to this many pixels (padding + crop), plus a
horizontal flip of half the images."""
OPTIMIZER_NAMES = {"sgd": "SGD nesterov momentum 0.9", "adamw": "AdamW betas (0.9, 0.999)"}


def augment(
    images: torch.Tensor, generator: torch.Generator, pad: int = SHIFT_PIXELS
) -> torch.Tensor:
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


@torch.no_grad()
def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        batch = images[start : start + 1000].float() / 255.0
        correct += (model(batch).argmax(1) == labels[start : start + 1000]).sum().item()
    return 100.0 * correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("zsq_plugins/zoo/weights"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.name]
    lr = args.lr if args.lr is not None else recipe.lr
    weight_decay = args.weight_decay if args.weight_decay is not None else recipe.weight_decay

    train_x, train_y = load_arrays("train")
    test_x, test_y = load_arrays("test")
    # channels_last roughly halves a training step of the depthwise convs on CPU (mkldnn).
    model = ARCHITECTURES[args.name]().to(memory_format=torch.channels_last)
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in exempt]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in exempt]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay}]
    if recipe.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_x) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=args.epochs * steps_per_epoch,
        pct_start=WARMUP_FRACTION,
    )
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = augment(train_x[index].float() / 255.0, generator)
            images = images.to(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(images), train_y[index], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        accuracy = test_accuracy(model, test_x, test_y)
        elapsed = time.perf_counter() - started
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total_loss / steps_per_epoch,
                "test_top1": accuracy,
                "elapsed_s": round(elapsed, 1),
            }
        )
        log.info(
            "%s epoch %d loss %.4f test %.2f%% (%.0fs)",
            args.name,
            epoch + 1,
            total_loss / steps_per_epoch,
            accuracy,
            elapsed,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.name}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    record = {
        "model": args.name,
        "recipe": {
            "optimizer": OPTIMIZER_NAMES[recipe.optimizer],
            "lr_max": lr,
            "schedule": "one-cycle",
            "pct_start": WARMUP_FRACTION,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "weight_decay": weight_decay,
            "label_smoothing": LABEL_SMOOTHING,
            "augmentation": f"random {SHIFT_PIXELS}-px translation + horizontal flip",
            "seed": args.seed,
            "threads": args.threads,
        },
        "history": history,
        "test_top1": history[-1]["test_top1"],
        "torch": torch.__version__,
    }
    (args.out / f"{args.name}.train.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
