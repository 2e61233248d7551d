"""Saving a toolkit's quantized model, and loading it back in a fresh process, without pickle.

A saved folder holds:

- ``state.safetensors``: the toolkit model's state (weights as calibration and reconstruction
  left them, every quantizer's step, zero point and switch);
- ``manifest.json``: the format, the toolkit, its options, the QuantSpec, where the FP model
  comes from (``source``: a zoo name or a factory reference, optional), the FP model's
  architecture (its state entries' names and shapes), the input shape, the library versions,
  and each file's sha256;
- ``model.onnx``, when asked: the adapter's QDQ export, which onnxruntime runs without this
  library.

Loading rebuilds the toolkit's model as ``apply`` built it (the adapter quantizes an FP model
of the saved architecture with the saved spec and options, calibrated on one seeded batch),
then loads the saved state into it strictly: every entry must match by name and shape. The FP
weights are not needed: the state holds every weight the toolkit's model uses. A save is
written into a temporary folder that is renamed into place, so an interruption leaves none
half-written.

None of the toolkits has a pickle-free format of its own for its quantized torch model that
records what the adapter sets (NNCF's ``get_config`` keeps its quantizers' widths as created,
before the adapter gives them the spec's); ONNX is the portable one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zsq_plugins.adapter import (
    Adapter,
    QuantizedModel,
    get_adapter,
    quantize_with_options,
)
from zsq_plugins.checksums import sha256_of
from zsq_plugins.configio import is_jsonable
from zsq_plugins.errors import CacheMismatchError, ChecksumMismatchError, ZSQError
from zsq_plugins.reporting import library_versions, write_json
from zsq_plugins.spec import QuantSpec

if TYPE_CHECKING:
    from zsq_plugins.api import ApplyReport

FORMAT = "zsq-quantized/1"
MANIFEST, STATE, ONNX = "manifest.json", "state.safetensors", "model.onnx"
REBUILD_SEED = 0
"""Seed of the batch that calibrates the rebuilt model before the saved state replaces it."""


def toolkit_package(adapter: Adapter) -> str:
    """The distribution that holds the adapter's toolkit (``torch`` for torch.ao)."""
    top = adapter.requires[0].split(".")[0] if adapter.requires else "torch"
    return (importlib.metadata.packages_distributions().get(top) or [top])[0]


def architecture(model: nn.Module) -> dict[str, list[int]]:
    """The FP model's state entries and their shapes: what a rebuilt model must match."""
    return {name: list(value.shape) for name, value in model.state_dict().items()}


def save_quantized(
    model: nn.Module,
    report: ApplyReport,
    folder: str | os.PathLike[str],
    *,
    fp_model: nn.Module,
    source: str | None = None,
    onnx: bool = False,
    overwrite: bool = False,
) -> Path:
    """Saves ``model``, the toolkit model that ``apply`` returned with ``report``, into
    ``folder``. ``fp_model`` is the FP model it was made from (its architecture is recorded);
    ``source`` says where ``load_quantized`` gets one again without being given it (a zoo name,
    ``path/to/file.py:factory`` or ``package.module:factory``). ``onnx`` also writes the
    adapter's QDQ ONNX export. An existing folder is replaced only with ``overwrite``."""
    quantized: QuantizedModel = report.quantized
    if model is not quantized.model:
        if hasattr(get_adapter(quantized.toolkit), "deploy"):
            raise ZSQError(
                f"a {quantized.toolkit} model is its ONNX file, which needs no manifest: "
                "write it with model.save(path) and load it with OnnxRuntimeModel.load(path)"
            )
        raise ZSQError("model is not the toolkit model of this report; pass apply's own pair")
    options = dict(report.toolkit_options)
    unsaved = [name for name, value in options.items() if not is_jsonable(value)]
    if unsaved:
        raise ZSQError(
            f"toolkit option(s) {unsaved} hold toolkit objects, which a manifest cannot record; "
            "give them as plain values (names, tables) to save the model"
        )
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ZSQError(f"{folder} exists; choose another folder, or pass overwrite=True")
    adapter = get_adapter(quantized.toolkit)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {
            key: value.detach().cpu().contiguous().clone()  # clones: no shared storage
            for key, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)
        }
        save_file(state, str(staging / STATE))
        example = torch.rand(1, *report.input_shape, generator=torch.Generator().manual_seed(0))
        if onnx:
            adapter.export_onnx(quantized, staging / ONNX, example)
        written = [name for name in (STATE, ONNX) if (staging / name).exists()]
        files = {name: sha256_of(staging / name) for name in written}
        package = toolkit_package(adapter)
        write_json(
            staging / MANIFEST,
            {
                "format": FORMAT,
                "toolkit": quantized.toolkit,
                "toolkit_options": options,
                "spec": quantized.spec.to_dict(),
                "source": source,
                "architecture": architecture(fp_model),
                "input_shape": list(report.input_shape),
                "versions": library_versions(("torch", package, "zsq-plugins")),
                "toolkit_package": package,
                "files": files,
            },
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved folder, checked to be one this library wrote."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZSQError(f"{folder} holds no saved quantized model (no {MANIFEST})") from None
    except json.JSONDecodeError as error:
        raise CacheMismatchError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{path} is not a {FORMAT} manifest")
    return manifest


def load_quantized(
    folder: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    toolkit: str | None = None,
) -> tuple[nn.Module, QuantizedModel]:
    """The toolkit model saved in ``folder`` and its handles, rebuilt from ``model`` (an FP
    model of the same architecture) or, without it, from the manifest's ``source``.
    ``toolkit``, when given, must be the one the model was saved from."""
    from zsq_plugins.model_source import load_model

    folder = Path(folder)
    manifest = read_manifest(folder)
    saved_toolkit = manifest["toolkit"]
    if toolkit is not None and toolkit != saved_toolkit:
        raise CacheMismatchError(
            f"{folder} holds a {saved_toolkit!r} model, not a {toolkit!r} one; load it with "
            f"toolkit={saved_toolkit!r}, or quantize the FP model with {toolkit!r}"
        )
    adapter = get_adapter(saved_toolkit)
    package = manifest["toolkit_package"]
    saved, installed = manifest["versions"].get(package), importlib.metadata.version(package)
    if saved != installed:
        raise CacheMismatchError(
            f"{folder} was saved with {package} {saved}; this is {package} {installed}, whose "
            f"{saved_toolkit!r} model may differ. Install {package}=={saved}, or quantize the "
            "FP model again with this version"
        )
    for name, digest in manifest["files"].items():
        if sha256_of(folder / name) != digest:
            raise ChecksumMismatchError(f"{folder / name} does not match its recorded sha256")
    if model is None:
        if not manifest.get("source"):
            raise ZSQError(
                f"{folder} records no source for its FP model; pass the FP model: "
                "load_quantized(folder, model)"
            )
        model = load_model(manifest["source"])
    if architecture(model) != manifest["architecture"]:
        raise CacheMismatchError(
            f"the FP model given does not have the architecture {folder} was saved from "
            "(its state entries or their shapes differ)"
        )
    spec = QuantSpec.from_dict(manifest["spec"])
    shape = manifest["input_shape"]
    batch = torch.rand(2, *shape, generator=torch.Generator().manual_seed(REBUILD_SEED))
    # apply's example input: two images (torch.export keeps a batch of one specialized)
    quantized = quantize_with_options(
        adapter, model.eval(), spec, [batch], batch, manifest["toolkit_options"]
    )
    quantized.model.load_state_dict(load_file(str(folder / STATE)), strict=True)
    return quantized.model, quantized


def export_onnx(
    model: nn.Module,
    report: ApplyReport,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
) -> Path:
    """The toolkit's QDQ ONNX export of ``model`` (``apply``'s pair with ``report``), traced
    on ``example_input`` (default: one random image of the report's input shape)."""
    quantized: QuantizedModel = report.quantized
    deployed = hasattr(get_adapter(quantized.toolkit), "deploy")  # onnxruntime: its session
    if model is not quantized.model and not deployed:
        raise ZSQError("model is not the toolkit model of this report; pass apply's own pair")
    if example_input is None:
        generator = torch.Generator().manual_seed(0)
        example_input = torch.rand(1, *report.input_shape, generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return get_adapter(quantized.toolkit).export_onnx(quantized, path, example_input)
