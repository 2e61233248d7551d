"""Sony MCT's data generation for a zoo ImageNet model: the external row of the generator
comparison, its images calibrated and reconstructed like ours through ``zsq compare``
(``[grid.external_data]``, docs/compare.md).

MCT is not one of the package's dependencies: it imports torchvision, which has no CPU build
on the package index this project installs from, so it runs in an environment of its own
(the CUDA builds of torch and torchvision import and run on a CPU-only machine):

    make mct-venv                                   # .cache/mct-venv (about 5 GB)
    PYTHONPATH=. .cache/mct-venv/bin/python benchmarks/mct_generation.py \\
        --seconds 1195 --out .cache/imagenet-synthetic/efficientnet_lite0/mct-n256-seed0

``--seconds`` makes the comparison one of equal generation time: a probe of two iterations
times one optimization step, and MCT gets as many iterations (each a step of every batch) as
fit, since its learning-rate schedule needs their number up front. Writes
``images.safetensors`` (``images``: N x C x H x W in the model's input space, pixels in
[0, 1] for the zoo's ImageNet models, which normalize inside) and ``manifest.json`` (MCT's
version and configuration, iterations, seconds, threads).

MCT optimizes images in a normalized space with a fixed set of normalizations; the model is
wrapped to take the ``KERAS_APPLICATIONS`` one ([-1, 1] for pixels 0..255) and turn it back
into the [0, 1] pixels the zoo model takes, so MCT's clipping to valid pixels is exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROBE_ITERATIONS = 2


class FromMCTSpace(nn.Module):
    """The zoo model, taking MCT's ``KERAS_APPLICATIONS`` space: x = pixel / 127.5 - 1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_pixels(x))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """MCT's [-1, 1] images as the [0, 1] pixels the zoo's ImageNet models take."""
    return (x + 1) / 2


def _generate(
    model: nn.Module, images: int, size: int, iterations: int, batch: int
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    import model_compression_toolkit as mct
    from model_compression_toolkit.data_generation.common.enums import ImageNormalizationType

    config = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=iterations,
        data_gen_batch_size=batch,
        image_normalization_type=ImageNormalizationType.KERAS_APPLICATIONS,
    )
    started = time.perf_counter()
    generated = mct.data_generation.pytorch_data_generation_experimental(
        model, images, size, config
    )
    seconds = time.perf_counter() - started
    stacked = torch.cat([image.detach().cpu() for image in generated])
    described = {
        name: (value.name if hasattr(value, "name") else value)
        for name, value in vars(config).items()
        if isinstance(value, (int, float, str, bool)) or hasattr(value, "name")
    }
    return to_pixels(stacked).clamp(0, 1), seconds, described


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0", help="a zoo ImageNet model")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="MCT's data_gen_batch_size")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--seconds", type=float, help="generation time to fill (probe timed)")
    budget.add_argument("--iterations", type=int, help="MCT's n_iter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--images, --batch and --threads must be positive")
    try:
        import model_compression_toolkit as mct
    except ImportError:
        parser.error("model_compression_toolkit is not installed here: run `make mct-venv` "
                     "and this script with .cache/mct-venv/bin/python")  # fmt: skip
    from safetensors.torch import save_file

    from zsq_plugins import zoo

    card = zoo.card(args.model)
    if card.dataset != "imagenet":
        parser.error(f"{args.model} is not an ImageNet model; MCT's generator is for those")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the same device our runs use: the CPU
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = FromMCTSpace(zoo.load(args.model)).eval()
    size = card.input_shape[-1]
    iterations = args.iterations
    probe = None
    if iterations is None:
        _, probe_seconds, _ = _generate(model, args.batch, size, PROBE_ITERATIONS, args.batch)
        batches = math.ceil(args.images / args.batch)
        per_iteration = probe_seconds / PROBE_ITERATIONS * batches
        iterations = max(1, int(args.seconds // per_iteration))
        probe = {"seconds": round(probe_seconds, 3), "iterations": PROBE_ITERATIONS}
        print(f"probe: {per_iteration:.1f} s an iteration; {iterations} iterations fill "
              f"{args.seconds:.0f} s", file=sys.stderr)  # fmt: skip
    images, seconds, config = _generate(model, args.images, size, iterations, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()}, args.out / "images.safetensors")
    manifest = {
        "tool": "model-compression-toolkit",
        "version": mct.__version__,
        "model": args.model,
        "images": len(images),
        "iterations": iterations,
        "batch": args.batch,
        "seconds": round(seconds, 3),
        "target_seconds": args.seconds,
        "probe": probe,
        "threads": args.threads,
        "seed": args.seed,
        "torch": torch.__version__,
        "config": config,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(images)} images in {seconds:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
