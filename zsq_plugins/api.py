"""``zsq_plugins.apply``: zero-shot quantization of a model inside a chosen toolkit."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsq_plugins.adapter import (
    ADAPTERS,
    QuantizedModel,
    check_toolkit_options,
    get_adapter,
    installed_adapters,
    quantize_with_options,
)
from zsq_plugins.budgets import auto_images
from zsq_plugins.configio import Budget, is_jsonable
from zsq_plugins.errors import UnknownPluginError
from zsq_plugins.phases import PhaseMeter
from zsq_plugins.quant.adaptive_bn import BNCorrection, adapt_batchnorm
from zsq_plugins.quant.clipping import ClipResult, clip_activations
from zsq_plugins.reconstruction import RECONSTRUCTIONS, ReconstructionReport
from zsq_plugins.reconstruction import reconstruct as run_reconstruction
from zsq_plugins.spec import QuantSpec
from zsq_plugins.synthesis.adversarial import adversarial_synthesize
from zsq_plugins.synthesis.api import calibration_loader, synthesize
from zsq_plugins.synthesis.model_info import infer_input_shape
from zsq_plugins.synthesis.presets import get_preset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ApplyReport:
    """What ``apply`` did: settings, where the data came from, and how long each step took."""

    toolkit: str
    spec: QuantSpec
    data: str
    num_samples: int
    seed: int
    timings_s: dict[str, float]
    quantized: QuantizedModel
    """The toolkit's model with its quantizer handles."""
    reconstruction: ReconstructionReport | None = None
    clipping: list[ClipResult] | None = None
    """Per activation quantizer, what accurate activation clipping changed (with ``aac``)."""
    adaptive_bn: list[BNCorrection] | None = None
    """Per conv/linear layer, the statistics gap adaptive BN corrected (with ``abn``)."""
    toolkit_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The options given to the toolkit's own call (``toolkit_options``)."""
    input_shape: tuple[int, ...] = ()
    """The shape of one input image (as the calibration data have it)."""
    synthesis: dict[str, Any] | None = None
    """With a generator preset: the preset, budget and resolved SynthesisConfig that made the
    images (what ``auto`` chose), and the generation's seconds."""
    peak_rss_mib: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per phase (as ``timings_s``), the process's peak resident memory in MiB while it ran
    (empty where the platform has no /proc)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "toolkit": self.toolkit,
            "toolkit_options": {  # toolkit objects as their repr
                k: v if is_jsonable(v) else repr(v) for k, v in self.toolkit_options.items()
            },
            "input_shape": list(self.input_shape),
            "spec": self.spec.to_dict(),
            "data": self.data,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "timings_s": self.timings_s,
            "peak_rss_mib": self.peak_rss_mib,
            "synthesis": self.synthesis,
            "quantizers": len(self.quantized.handles),
            "adapter_report": self.quantized.report,
            "reconstruction": self.reconstruction.to_dict() if self.reconstruction else None,
            "clipping": ([dataclasses.asdict(c) for c in self.clipping] if self.clipping else None),
            "adaptive_bn": (
                [dataclasses.asdict(c) for c in self.adaptive_bn] if self.adaptive_bn else None
            ),
        }


class _ProgressBatches:
    """The calibration batches, advancing a progress bar as the toolkit reads them (its
    calibration runs inside the toolkit, the one phase without a bar of its own). A toolkit
    that reads the data more than once (NNCF: a batch to trace, then the statistics) restarts
    the bar with each pass."""

    def __init__(self, loader: DataLoader, bar: Any) -> None:
        self.loader, self.bar = loader, bar

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.bar.reset(total=len(self.loader))
        for batch in self.loader:
            self.bar.update(1)  # before the yield: a toolkit may stop reading at its last batch
            yield batch


class _FirstImages:
    """The batches of a user's DataLoader up to ``limit`` images (the last batch cut short), as
    many times as a toolkit iterates it; nothing beyond the batch in hand is held."""

    def __init__(self, loader: DataLoader, limit: int) -> None:
        self.loader, self.limit = loader, limit
        batches, size = len(loader), loader.batch_size or 1
        self.batches = min(batches, -(-limit // size))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        left = self.limit
        for batch in self.loader:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            if len(images) > left:
                images = images[:left]
                batch = (images, *batch[1:]) if isinstance(batch, tuple | list) else images
            left -= len(images)
            yield batch
            if left <= 0:
                return


def _calibration_batches(
    model: nn.Module,
    data: str | Dataset | DataLoader | torch.Tensor,
    num_samples: int,
    seed: int,
    synthesis: dict[str, Any],
    toolkit: str,
    spec: QuantSpec,
) -> tuple[Any, str, int]:
    if not isinstance(data, str) and synthesis:
        raise TypeError(f"options {sorted(synthesis)} apply only when data is a preset name")
    if isinstance(data, DataLoader):
        size = len(data.dataset)  # type: ignore[arg-type]
        return _FirstImages(data, num_samples), "DataLoader", min(size, num_samples)
    if isinstance(data, str):
        budget = synthesis.get("budget", Budget.AUTO)
        if get_preset(data).config(budget).needs_opponent:  # ZAQ: plays this toolkit's model
            dataset = adversarial_synthesize(
                model, toolkit, spec, num_samples, data, seed, **synthesis
            )
        else:
            dataset = synthesize(model, num_samples, data, seed, **synthesis)
        return calibration_loader(dataset), data, len(dataset)
    source = type(data).__name__
    if isinstance(data, torch.Tensor):
        data = data[:num_samples]
    elif len(data) > num_samples:  # type: ignore[arg-type]
        data = torch.utils.data.Subset(data, range(num_samples))
    loader = calibration_loader(data)
    return loader, source, len(loader.dataset)  # type: ignore[arg-type]


def _synthesis_record(loader: Any) -> dict[str, Any] | None:
    """What made synthetic calibration data (None for the user's own data)."""
    dataset = getattr(loader, "dataset", None)
    manifest = getattr(dataset, "manifest", None)
    if not isinstance(manifest, dict) or "identity" not in manifest:
        return None
    # An adversarial set is made in rounds, each a set of its own: the last one's settings.
    rounds = manifest.get("rounds") or [manifest]
    last = rounds[-1].get("identity", {})
    seconds = [r.get("generation_seconds") for r in rounds]
    return {
        "preset": manifest["identity"].get("preset"),
        "budget": last.get("budget"),
        "config": last.get("config"),
        "generation_seconds": sum(seconds) if None not in seconds else None,
    }


def _input_shape(
    model: nn.Module, data: str | Dataset | DataLoader | torch.Tensor, synthesis: dict[str, Any]
) -> tuple[int, ...] | None:
    """The shape of one input image: from the data, else from the synthesis options or the
    model (None when unknown: the steps that need it say so)."""
    if isinstance(data, torch.Tensor):
        return tuple(data.shape[1:])
    if isinstance(data, DataLoader | Dataset):
        dataset = data.dataset if isinstance(data, DataLoader) else data
        item = dataset[0]
        image = item[0] if isinstance(item, tuple | list) else item
        return tuple(image.shape) if isinstance(image, torch.Tensor) else None
    if synthesis.get("input_spec") is not None:
        return tuple(synthesis["input_spec"].shape)
    if synthesis.get("input_shape") is not None:
        return tuple(synthesis["input_shape"])
    return infer_input_shape(model)


def apply(
    model: nn.Module,
    toolkit: str = "fx",
    spec: QuantSpec | str | None = None,
    data: str | Dataset | DataLoader | torch.Tensor = "genie",
    num_samples: int | None = None,
    reconstruct: str | None = None,
    seed: int = 0,
    *,
    reconstruct_budget: str = "auto",
    reconstruct_options: dict[str, Any] | None = None,
    reconstruct_checkpoint: str | os.PathLike[str] | None = None,
    aac: bool = False,
    abn: bool = False,
    toolkit_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **synthesis: Any,
) -> tuple[nn.Module, ApplyReport]:
    """Quantizes ``model`` with ``toolkit`` (``fx``, ``pt2e``, ``nncf``, ``brevitas`` or a
    plugin's), calibrated on ``data``: a generator preset name (synthesized for the model:
    zero-shot), or your own Dataset, DataLoader or tensor of images, of which the first
    ``num_samples`` are used (a DataLoader is read batch by batch up to that many; the steps
    after calibration hold those images, never more). ``num_samples`` defaults to 1,024
    images, fewer (down to 128) for models that cost more per image than the Fashion-MNIST
    zoo models (the ``auto`` budget, zsq_plugins.budgets).

    ``reconstruct`` names a reconstruction preset (``adaround``, ``brecq``, ``qdrop``,
    ``genie-m``) run on the toolkit's own model after calibration, with the same images and
    ``reconstruct_budget`` (``auto``, ``cpu`` or ``paper``; ``auto`` scales the ``cpu`` steps
    to the model's cost, as ``budget`` does for generation); ``reconstruct_options`` override any
    ReconstructionConfig field (``{"iterations": 500}``); ``reconstruct_checkpoint`` names a
    folder where the reconstruction saves its state after every block, so that the same call
    resumes it after an interruption. ``aac`` sets every activation
    quantizer's range, after the toolkit's calibration, to the MSE-optimal clip of the FP
    model's activations on the same images (accurate activation clipping,
    zsq_plugins.quant.clipping). ``abn`` (adaptive BN, after AAC) corrects every
    conv/linear layer's per-channel output mean and deviation toward the FP model's on the
    same images (zsq_plugins.quant.adaptive_bn). ``toolkit_options`` reach the toolkit's own
    call and win over the adapter's defaults (``accepted_options(get_adapter(toolkit))``
    lists them; docs/adapters.md says what each adapter sets and why). Returns the
    toolkit-native quantized model and a report (settings, timings, ``report.quantized`` with
    the quantizer handles). For ``onnxruntime`` the model is an ``OnnxRuntimeModel`` (an
    InferenceSession called like a torch model; ``report.quantized.model`` is the torch mirror
    of its QDQ graph that the core's steps worked on).
    ``synthesis`` options (``budget``, ``iterations``...) go to ``synthesize`` when ``data`` is
    a preset name.
    """
    if reconstruct is not None:  # an unknown preset or option fails before any work
        RECONSTRUCTIONS.get(reconstruct).config(reconstruct_budget).replace(
            **(reconstruct_options or {})
        )
    elif reconstruct_options or reconstruct_checkpoint is not None:
        raise TypeError(
            "reconstruct_options and reconstruct_checkpoint need reconstruct=<preset name>"
        )
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec or QuantSpec()
    if toolkit not in ADAPTERS:
        raise UnknownPluginError(
            f"unknown toolkit {toolkit!r}; installed: {', '.join(installed_adapters()) or 'none'}"
            f" (registered: {', '.join(ADAPTERS.names())})"
        )
    adapter = get_adapter(toolkit)
    if toolkit_options:  # an unknown option fails before any work
        check_toolkit_options(adapter, toolkit_options)
    model = model.eval()
    meter = PhaseMeter()
    started = time.perf_counter()
    if num_samples is None:
        num_samples = auto_images(model, _input_shape(model, data, synthesis))
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    synthesis_options = {**synthesis}
    if isinstance(data, str):
        synthesis_options.update(cache_dir=cache_dir, progress=progress)
    with meter.phase("data"):
        loader, source, count = _calibration_batches(
            model, data, num_samples, seed, synthesis_options, toolkit, spec
        )
    first = next(iter(loader))
    example_input = (first[0] if isinstance(first, tuple | list) else first)[:2]
    with (
        meter.phase("quantize_and_calibrate"),
        tqdm(desc=f"calibrate ({toolkit})", unit="batch", disable=not progress) as bar,
    ):
        batches = _ProgressBatches(loader, bar)
        quantized = quantize_with_options(
            adapter, model, spec, batches, example_input, toolkit_options
        )
    images = None
    if aac or abn or reconstruct is not None:
        images = torch.cat([b[0] if isinstance(b, tuple | list) else b for b in loader])
    # AAC first: it reads FP activations through identity overrides of the toolkit's model,
    # whose float weights ABN rescales; and ABN should correct the statistics that the final
    # activation ranges produce.
    with meter.phase("clip"):
        clipping = clip_activations(quantized, images, seed=seed) if aac else None
    with meter.phase("abn"):
        corrections = adapt_batchnorm(quantized, model, images, progress=progress) if abn else None
    reconstruction = None
    with meter.phase("reconstruct"):
        if reconstruct is not None:
            reconstruction = run_reconstruction(
                quantized,
                model,
                images,
                reconstruct,
                budget=reconstruct_budget,
                seed=seed,
                progress=progress,
                checkpoint_dir=reconstruct_checkpoint,
                **(reconstruct_options or {}),
            )
    total = round(time.perf_counter() - started, 3)
    report = ApplyReport(
        toolkit=toolkit,
        spec=spec,
        data=source,
        num_samples=count,
        seed=seed,
        timings_s={**meter.seconds, "total": total},
        peak_rss_mib=meter.peak_rss_mib,
        quantized=quantized,
        reconstruction=reconstruction,
        clipping=clipping,
        adaptive_bn=corrections,
        toolkit_options=dict(toolkit_options or {}),
        input_shape=tuple(example_input.shape[1:]),
        synthesis=_synthesis_record(loader),
    )
    log.info("apply(%s, %s): %s", toolkit, spec.label, report.timings_s)
    return deployed_model(adapter, quantized), report


def deployed_model(adapter: Any, quantized: QuantizedModel) -> nn.Module:
    """What ``apply`` hands back: the toolkit's model, or for a toolkit that runs outside
    torch (onnxruntime) what its adapter's ``deploy`` makes of the torch stand-in the core
    worked on (``report.quantized.model``)."""
    deploy = getattr(adapter, "deploy", None)
    return deploy(quantized) if deploy is not None else quantized.model
