"""The seam between the core and a quantization toolkit: adapters and quantizer handles.

An adapter builds the toolkit's own quantized model for a QuantSpec,
calibrates it with our data in the toolkit's native way, exposes every quantizer as a
``QuantizerHandle`` named after the FP model's modules, and exports ONNX. The algorithms
(synthesis, reconstruction, clipping) live in the core and reach the toolkit's model only
through these handles.

Adapters register in the ``zsq_plugins.adapters`` entry-point group; ``get_adapter(name)``
finds them, and imports a toolkit only when its adapter is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from zsq_plugins.errors import MissingDependencyError, ToolkitOptionError
from zsq_plugins.registry import ADAPTERS_GROUP, Registry
from zsq_plugins.spec import QuantSpec


class QuantizerKind(str, Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


@runtime_checkable
class QuantizerHandle(Protocol):
    """One quantizer of a toolkit's model, readable and writable by the core.

    ``layer`` is the FP model's module name the quantizer belongs to: for a weight quantizer,
    the conv/linear whose weight it quantizes; for an activation quantizer, the module whose
    output it quantizes (``"input"`` for the model's input). ``module`` is the toolkit's
    quantizer module itself, so that the core can hook it.
    """

    @property
    def layer(self) -> str: ...

    @property
    def kind(self) -> QuantizerKind: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def bits(self) -> int: ...

    @property
    def quant_min(self) -> int:
        """Lowest integer level; may be a narrow range (Brevitas: -7 at 4 bits), so never
        derive it from ``bits``."""

    @property
    def quant_max(self) -> int: ...

    @property
    def axis(self) -> int | None:
        """The per-channel axis of scale and zero point, or None for per-tensor."""

    def scale(self) -> torch.Tensor: ...

    def set_scale(self, value: torch.Tensor) -> None: ...

    def zero_point(self) -> torch.Tensor: ...

    def set_zero_point(self, value: torch.Tensor) -> None: ...

    @property
    def enabled(self) -> bool: ...

    def set_enabled(self, enabled: bool) -> None: ...

    def override(
        self, function: Callable[..., torch.Tensor], *, with_output: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Until the returned handle is removed, and while the quantizer is enabled, its
        output is ``function(x)`` (``x``: its float input; for a weight quantizer, the float
        weight) instead of the toolkit's own quantization. Gradients flow through
        ``function``: this is how the core's learned rounding and step sizes act inside the
        toolkit's own model. With ``with_output``, ``function(x, output)`` also receives the
        toolkit's own output for ``x`` (its quantization with the current parameters): the
        core's learned steps take their forward value from it, so that they round ties
        exactly as the toolkit does (toolkits differ in the arithmetic: ``x * (1 / s)`` or
        ``x / s``, the zero point added before or after rounding)."""


class HandleBase:
    """What every adapter's handle stores the same way: its layer, kind and quantizer module.
    Adapters subclass it and add the toolkit-specific reads and writes."""

    def __init__(self, layer: str, kind: QuantizerKind, module: nn.Module) -> None:
        self._layer, self._kind, self._module = layer, kind, module

    @property
    def layer(self) -> str:
        return self._layer

    @property
    def kind(self) -> QuantizerKind:
        return self._kind

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def override(
        self, function: Callable[..., torch.Tensor], *, with_output: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Default for quantizer modules that map a tensor to a tensor: a forward hook that
        returns ``function(input)`` (``function(input, output)`` with ``with_output``) while
        the quantizer is enabled."""

        def replace(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            return function(args[0], output) if with_output else function(args[0])

        return self._module.register_forward_hook(replace)

    def __repr__(self) -> str:
        bits = getattr(self, "bits", "?")
        return f"{type(self).__name__}({self.layer!r}, {self.kind.value}, {bits} bits)"


@dataclasses.dataclass
class QuantizedModel:
    """A toolkit-native quantized model and the handles of its quantizers."""

    toolkit: str
    model: nn.Module
    spec: QuantSpec
    handles: list[QuantizerHandle]
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def weight_handles(self) -> list[QuantizerHandle]:
        return [h for h in self.handles if h.kind is QuantizerKind.WEIGHT]

    def activation_handles(self) -> list[QuantizerHandle]:
        return [h for h in self.handles if h.kind is QuantizerKind.ACTIVATION]

    def handle(self, layer: str, kind: QuantizerKind | str) -> QuantizerHandle:
        kind = QuantizerKind(kind)
        for candidate in self.handles:
            if candidate.layer == layer and candidate.kind is kind:
                return candidate
        known = sorted({h.layer for h in self.handles if h.kind is kind})
        raise KeyError(f"no {kind.value} quantizer for {layer!r}; layers with one: {known}")


@runtime_checkable
class Adapter(Protocol):
    """What a toolkit adapter provides."""

    name: str
    """The toolkit name used by ``apply(model, toolkit=name)``."""
    requires: tuple[str, ...]
    """Importable modules the adapter needs (checked before it is used)."""
    pip_extra: str | None
    """The zsq-plugins extra that installs them."""

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
    ) -> QuantizedModel:
        """Builds the toolkit's quantized model for ``spec`` (BN folded first) and calibrates
        it with the batches of ``calibration`` in the toolkit's own way.

        In the returned model, ``model.get_submodule(layer)`` is the toolkit's module of each
        weight handle's layer: a forward pre-hook on it sees the layer's input (the
        reconstruction routine stops there) and it carries the layer's float ``bias``
        (adaptive BN writes it)."""

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """Writes a QDQ/QCDQ ONNX file that onnxruntime runs; raises NotImplementedError for
        a toolkit without ONNX export."""


# An adapter whose toolkit runs outside torch (onnxruntime) hands the core a torch stand-in
# with handles as ``QuantizedModel.model``, and declares ``deploy(quantized) -> nn.Module``:
# the toolkit's own model with everything the core wrote into the stand-in, which ``apply``
# returns. Optional, like toolkit options.

# Toolkit options are optional for an adapter, so they stay out of the protocol (a
# runtime-checkable Protocol would refuse every adapter without them): an adapter that takes
# some declares ``options``, {option name: what it does and what the adapter's default is},
# and accepts ``quantize(..., options={...})``, where the user's value wins over its own.


def accepted_options(adapter: Adapter) -> Mapping[str, str]:
    """The toolkit options ``adapter`` takes, with what each does (none if it declares none)."""
    return getattr(adapter, "options", {})


def check_toolkit_options(adapter: Adapter, options: Mapping[str, Any]) -> None:
    """Raises ToolkitOptionError naming the options ``adapter`` does not take, and listing
    those it does."""
    if not isinstance(options, Mapping):
        raise ToolkitOptionError(
            f"toolkit options must be a mapping of option names to values, got {options!r}"
        )
    accepted = accepted_options(adapter)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listing = "; ".join(f"{name}: {what}" for name, what in accepted.items())
        raise ToolkitOptionError(
            f"the {adapter.name!r} toolkit takes no option {', '.join(map(repr, unknown))}; "
            + (f"it takes: {listing}" if listing else "it takes no options")
        )


def quantize_with_options(
    adapter: Adapter,
    model: nn.Module,
    spec: QuantSpec,
    calibration: Iterable[Any],
    example_input: torch.Tensor,
    options: Mapping[str, Any] | None = None,
) -> QuantizedModel:
    """``adapter.quantize``, given ``options`` (checked first) when there are any, so that an
    adapter without options is called exactly as the protocol says."""
    if not options:
        return adapter.quantize(model, spec, calibration, example_input)
    check_toolkit_options(adapter, options)
    return adapter.quantize(model, spec, calibration, example_input, options=dict(options))


ADAPTERS: Registry[Any] = Registry("toolkit adapter", ADAPTERS_GROUP)


def missing_requirements(adapter: Adapter) -> list[str]:
    return [name for name in adapter.requires if importlib.util.find_spec(name) is None]


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``, checked to be usable; clear errors otherwise."""
    factory = ADAPTERS.get(name)
    adapter = factory() if isinstance(factory, type) else factory
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"adapter {name!r} ({type(adapter).__name__}) does not implement the Adapter "
            "protocol (name, requires, pip_extra, quantize, export_onnx)"
        )
    missing = missing_requirements(adapter)
    if missing:
        extra = f"pip install 'zsq-plugins[{adapter.pip_extra}]'" if adapter.pip_extra else ""
        # An adapter whose requirement no pip extra installs says what to do instead.
        hint = getattr(adapter, "missing_hint", "")
        raise MissingDependencyError(
            f"the {name!r} adapter needs {', '.join(missing)}, which is not installed"
            + (f"; install it with: {extra}" if extra else "")
            + (f"; {hint}" if hint else "")
        )
    return adapter


def installed_adapters() -> list[str]:
    """Names of registered adapters whose toolkit is installed."""
    names = []
    for name in ADAPTERS.names():
        try:
            get_adapter(name)
        except (MissingDependencyError, TypeError, ImportError):
            continue
        names.append(name)
    return names
