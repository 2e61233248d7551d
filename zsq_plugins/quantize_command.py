"""``zsq quantize``: one model (a zoo name, or yours: ``path/to/file.py:factory`` or
``package.module:factory`` with ``--weights``) in one toolkit, evaluated against FP32, saved
and exported on request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq_plugins.budgets import auto_images
from zsq_plugins.configio import parse_key_values
from zsq_plugins.errors import ZSQError
from zsq_plugins.input_spec import InputSpec

CONTRACT_FLAGS = {
    "--input-shape": "input_shape",
    "--mean": "mean",
    "--std": "std",
    "--pixel-range": "pixel_range",
}
"""The command line's input contract of a user model: flag -> argparse attribute."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> ``(3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ZSQError(f"--input-shape takes C,H,W (three positive integers), got {text!r}")
    return shape


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` -> a tuple of floats (None stays None)."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ZSQError(f"{flag} takes numbers separated by commas, got {text!r}") from None


def _pixel_range(text: str | None) -> dict[str, float]:
    values = parse_floats(text, "--pixel-range")
    if values is None:
        return {}
    if len(values) != 2:
        raise ZSQError(f"--pixel-range takes LOW,HIGH, got {text!r}")
    return {"low": values[0], "high": values[1]}


def input_spec_from(args: argparse.Namespace) -> InputSpec:
    """The InputSpec of ``--input-shape``, ``--mean``/``--std`` and ``--pixel-range``."""
    try:
        return InputSpec(
            shape=parse_shape(args.input_shape), mean=parse_floats(args.mean, "--mean"),
            std=parse_floats(args.std, "--std"), **_pixel_range(args.pixel_range),
        )  # fmt: skip
    except ValueError as error:
        raise ZSQError(str(error)) from None


def _zoo_data(args: argparse.Namespace, out: Path) -> tuple[nn.Module, torch.Tensor, Any]:
    """A zoo model, its calibration images (cached like ``zsq compare``'s) and test set."""
    from zsq_plugins.compare import GridConfig, calibration_images, evaluation_data
    from zsq_plugins.model_source import load_model
    from zsq_plugins.zoo import card as model_card

    given = [flag for flag, value in CONTRACT_FLAGS.items() if getattr(args, value) is not None]
    if given or args.eval_dir is not None:
        raise ZSQError(
            f"{args.model} is a zoo model, which declares its input and evaluation data; "
            f"{', '.join(given) or '--eval-dir'} are for a model of your own"
        )

    model = load_model(args.model, args.weights)
    num_samples = args.num_samples or auto_images(model, model_card(args.model).input_shape)
    config = GridConfig(
        models=(args.model,),
        toolkits=(args.toolkit,),
        data=(args.data,),
        specs=(args.spec,),
        num_samples=num_samples,
        seed=args.seed,
        synthesis_budget=args.budget,
        reconstruct_budget=args.budget,
    )
    images = calibration_images(args.model, args.data, config, out / "data", not args.no_progress)
    return model, images, evaluation_data(args.model, None)


def _own_data(args: argparse.Namespace, out: Path) -> tuple[nn.Module, torch.Tensor, Any]:
    """A user's model, zero-shot images for it, and its evaluation images: the labelled
    ``--eval-dir`` folder, or held-out synthetic images (agreement and KL to FP32 only)."""
    from zsq_plugins.compare import REAL
    from zsq_plugins.synthesis import synthesize
    from zsq_plugins.user_models import UserModel

    if args.input_shape is None:
        raise ZSQError(f"{args.model} is not a zoo model: give its --input-shape C,H,W")
    if args.data == REAL:
        raise ZSQError(
            "--data real needs the model's training images, which only the zoo's models have "
            "here; use a generator preset (genie, zeroq, dsg, noise, ...)"
        )
    spec = input_spec_from(args)
    try:
        user = UserModel(
            source=args.model, weights=args.weights, input_shape=spec.shape, mean=spec.mean,
            std=spec.std, low=spec.low, high=spec.high, eval_dir=args.eval_dir,
            eval_preset=args.data, eval_samples=args.eval_samples,
        )  # fmt: skip
    except ValueError as error:
        raise ZSQError(str(error)) from None
    model = user.load()
    num_samples = args.num_samples or auto_images(model, user.input_shape)
    images = synthesize(
        model, num_samples, args.data, args.seed, budget=args.budget,
        input_spec=user.input_spec, cache_dir=out / "data" / args.data,
        progress=not args.no_progress,
    ).images  # fmt: skip
    test = user.evaluation_data(
        model, None, out / "data", args.seed, args.budget, not args.no_progress
    )
    return model, images, test


def run_quantize(args: argparse.Namespace) -> int:
    from zsq_plugins import apply, evaluate
    from zsq_plugins.adapter import check_toolkit_options, get_adapter
    from zsq_plugins.compare import REAL
    from zsq_plugins.reporting import write_json
    from zsq_plugins.saving import export_onnx, save_quantized
    from zsq_plugins.spec import QuantSpec
    from zsq_plugins.zoo import card

    toolkit_options = parse_key_values(args.toolkit_option, "--toolkit-option")
    check_toolkit_options(get_adapter(args.toolkit), toolkit_options)  # before any work
    spec = QuantSpec.parse(args.spec)
    save = Path(args.save) if args.save else None
    if save is not None and save.exists():
        raise ZSQError(f"--save {save} exists; choose another folder, or delete it")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    zoo_model = ":" not in args.model
    load = _zoo_data if zoo_model else _own_data
    fp_model, images, test = load(args, out)
    model, report = apply(
        fp_model, args.toolkit, spec, data=images, num_samples=len(images),
        reconstruct=args.reconstruct,
        seed=args.seed, reconstruct_budget=args.budget, aac=args.aac, abn=args.abn,
        toolkit_options=toolkit_options, progress=not args.no_progress,
    )  # fmt: skip
    result = evaluate(model, test, fp_model, progress=not args.no_progress)
    summary = {
        "model": args.model,
        "fp32_top1": card(args.model).published_top1 if zoo_model else None,
        "top1": result.top1,
        "agreement": result.agreement,
        "kl": result.kl,
        "num_test": result.num_samples,
        "real_data": args.data == REAL,
        **report.to_dict(),
    }
    if args.onnx is not None:
        name = f"{Path(args.model.replace(':', '-')).name}-{args.toolkit}-{spec.label}.onnx"
        path = export_onnx(model, report, Path(args.onnx) if args.onnx else out / name)
        summary["onnx"] = str(path)
    if save is not None:
        save_quantized(model, report, save, fp_model=fp_model, source=args.model)
        summary["saved"] = str(save)
    write_json(out / "report.json", summary)
    print(json.dumps({k: summary[k] for k in ("model", "fp32_top1", "top1", "agreement")}))
    return 0
