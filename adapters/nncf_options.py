"""NNCF's own options, as ``NNCFAdapter.quantize(..., options=...)`` takes them: the arguments
of ``nncf.quantize``, given as NNCF's objects or as plain values (names, tables) that a TOML
file or the command line can hold. The user's value of an option replaces the adapter's."""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from types import MappingProxyType
from typing import Any

from zsq_plugins.errors import ToolkitOptionError


def load_nncf() -> Any:
    """nncf, imported on first use. NNCF 3.4 sends telemetry events unless NNCF_CI or NNCF_DEV
    is set when it is imported (its only switch; NNCF reads NNCF_CI for nothing else), so it
    is set unless the user has set it. The openvino_telemetry client that NNCF creates at
    import still keeps a usage counter in ~/intel; only CI=true (read by many tools, so not
    set here) or an opt-out consent file stops that."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


OPTIONS = MappingProxyType(
    {
        "preset": "nncf.QuantizationPreset or its name (performance, mixed), which then sets the "
        "weight and activation modes; default: the spec's symmetries",
        "target_device": "nncf.TargetDevice or its name (any, cpu, gpu, npu, cpu_spr); default "
        "NNCF's (any)",
        "subset_size": "how many calibration batches NNCF reads; default: all of them (NNCF's "
        "default, 300, would skip some)",
        "fast_bias_correction": "NNCF's choice of bias correction algorithm; bias correction is "
        "off by default (advanced_parameters.disable_bias_correction)",
        "model_type": "nncf.ModelType or its name (transformer); default none",
        "ignored_scope": "nncf.IgnoredScope, or a table of its fields (names, patterns, types, "
        "subgraphs): layers NNCF leaves float",
        "advanced_parameters": "nncf.AdvancedQuantizationParameters (replaces the adapter's), or a "
        "table of its fields, each replacing the adapter's value (enums by name); the adapter sets "
        "disable_bias_correction, overflow_fix=disable, batchwise_statistics=false, the spec's "
        "modes and min-max ranges (module docstring)",
    }
)
"""What ``quantize(..., options=...)`` takes: ``nncf.quantize``'s own arguments."""


def _enum_value(enum: Any, value: Any, option: str) -> Any:
    """``value`` as a member of ``enum``, which may be given by its value or its name."""
    if isinstance(value, enum):
        return value
    for member in enum:
        if isinstance(value, str) and value.lower() in (
            str(member.value).lower(),
            member.name.lower(),
        ):
            return member
    names = ", ".join(member.name.lower() for member in enum)
    raise ToolkitOptionError(f"NNCF option {option}={value!r} is not one of: {names}")


def _replace_fields(defaults: Any, fields: dict[str, Any], option: str) -> Any:
    """A copy of the dataclass ``defaults`` with ``fields`` replaced (enums given by name)."""
    known = {field.name: field for field in dataclasses.fields(defaults)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ToolkitOptionError(
            f"NNCF option {option} has no field {unknown}; its fields: {', '.join(known)}"
        )
    values = {}
    for name, value in fields.items():
        current = getattr(defaults, name)
        if isinstance(current, Enum):
            value = _enum_value(type(current), value, f"{option}.{name}")
        values[name] = value
    return dataclasses.replace(defaults, **values)


def nncf_arguments(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``nncf.quantize``'s keyword arguments: the adapter's ``defaults``, each replaced by the
    user's option of the same name (plain values converted to NNCF's types)."""
    nncf = load_nncf()
    arguments = dict(defaults)
    if "preset" in options:
        # The adapter's advanced parameters name the spec's modes, which NNCF ranks above a
        # preset: leave the modes to the user's preset.
        advanced = arguments["advanced_parameters"]
        arguments["advanced_parameters"] = dataclasses.replace(
            advanced,
            weights_quantization_params=dataclasses.replace(
                advanced.weights_quantization_params, mode=None
            ),
            activations_quantization_params=dataclasses.replace(
                advanced.activations_quantization_params, mode=None
            ),
        )
    for name, value in options.items():
        if name in ("preset", "target_device", "model_type"):
            enum = {
                "preset": nncf.QuantizationPreset,
                "target_device": nncf.TargetDevice,
                "model_type": nncf.ModelType,
            }[name]
            value = _enum_value(enum, value, name)
        elif name == "ignored_scope" and isinstance(value, dict):
            try:
                value = nncf.IgnoredScope(**value)
            except TypeError as error:
                raise ToolkitOptionError(f"NNCF option ignored_scope: {error}") from None
        elif name == "advanced_parameters" and isinstance(value, dict):
            value = _replace_fields(arguments["advanced_parameters"], value, name)
        arguments[name] = value
    return arguments
