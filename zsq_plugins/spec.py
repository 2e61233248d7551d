"""``QuantSpec``: what to quantize and how, independent of any toolkit."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

from zsq_plugins.configio import check_fields, to_json_dict
from zsq_plugins.errors import ZSQError

MIN_BITS, MAX_BITS = 2, 8
OVERFLOW_SAFE_WEIGHT_BITS = 7
"""Weight bits that keep x86 u8 x s8 int8 kernels exact without VNNI (``overflow_fix``)."""


class Granularity(str, Enum):
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class Symmetry(str, Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """Bit widths and quantizer layout, in the literature's standard setting by default.

    The defaults follow the standard PTQ setting of BRECQ/QDrop/Genie (docs/quantspec.md):
    per-output-channel symmetric weights, per-tensor asymmetric activations, and the first
    conv and last linear layer (with their inputs) kept at 8 bits, less one weight bit where
    x86 int8 kernels need it (``overflow_fix``).
    """

    weight_bits: int = 8
    """Bits of every weight quantizer except those of layers kept at 8 bits (2..8)."""
    act_bits: int = 8
    """Bits of every activation quantizer except the inputs of layers kept at 8 bits (2..8)."""
    weight_granularity: Granularity = Granularity.PER_CHANNEL
    act_granularity: Granularity = Granularity.PER_TENSOR
    weight_symmetry: Symmetry = Symmetry.SYMMETRIC
    act_symmetry: Symmetry = Symmetry.ASYMMETRIC
    weight_narrow_range: bool = False
    """Symmetric weights on the narrow grid [-(2^(b-1) - 1), 2^(b-1) - 1] (NNCF's and
    Brevitas' own default, what OpenVINO runs) instead of the full [-2^(b-1), 2^(b-1) - 1]
    (torch.ao's default, and the papers'). Off by default so that one spec is one grid in
    every toolkit: at 3 bits the narrow grid has 7 levels instead of 8, at 2 bits it is
    ternary."""
    keep_first_last_8bit: bool = True
    """Keep the first conv and the last linear layer, and their inputs, at 8 bits."""
    keep_8bit: tuple[str, ...] = ()
    """Further module names (of the FP model) whose weights and inputs stay at 8 bits."""
    fold_batchnorm: bool = True
    """Fold BatchNorm into the preceding convolution before quantizing."""
    overflow_fix: bool = True
    """Give a layer whose weights and input are both 8-bit 7-bit weights ([-64, 63]), so that
    its int8 model and its QDQ ONNX compute what the simulation computes on every x86 CPU.
    Without VNNI (AVX2, or AVX-512 before Cascade Lake), u8 x s8 kernels (fbgemm in torch,
    onnxruntime's U8S8) add each pair of products in saturating int16: 2 x 255 x 128 overflows
    it, 2 x 255 x 64 does not, whatever the input. Off: the literature's full 8-bit grid (what
    the papers report), exact in int8 only on VNNI CPUs and other hardware; quantizers below
    8 bits are never affected. NNCF calls the same remedy its overflow fix; torch's x86
    qconfigs instead give activations 7 bits (``reduce_range``), which the int8 kernels do not
    clamp to, so an input beyond the calibrated range can still overflow."""

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(
                    f"{field}={value} is out of range; supported bit widths are "
                    f"{MIN_BITS}..{MAX_BITS}"
                )
        for field, enum in (
            ("weight_granularity", Granularity),
            ("act_granularity", Granularity),
            ("weight_symmetry", Symmetry),
            ("act_symmetry", Symmetry),
        ):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum(value))
            except ValueError:
                choices = ", ".join(repr(member.value) for member in enum)
                raise ValueError(f"{field} must be one of {choices}; got {value!r}") from None
        for field in ("weight_narrow_range", "keep_first_last_8bit", "fold_batchnorm",
                      "overflow_fix"):  # fmt: skip
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}")
        keep = self.keep_8bit
        if isinstance(keep, str) or not all(isinstance(name, str) for name in keep):
            raise ValueError(f"keep_8bit must be a sequence of module names, got {keep!r}")
        object.__setattr__(self, "keep_8bit", tuple(keep))

    def int8_weight_bits(self, weight_bits: int, input_bits: int) -> int:
        """The weight bits of a conv/linear layer with ``weight_bits`` and ``input_bits``:
        unchanged, except 7 where both are 8 and ``overflow_fix`` is on."""
        if self.overflow_fix and weight_bits == input_bits == 8:
            return OVERFLOW_SAFE_WEIGHT_BITS
        return weight_bits

    @property
    def label(self) -> str:
        """The short name used in tables, e.g. ``W4A4``."""
        return f"W{self.weight_bits}A{self.act_bits}"

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        check_fields(cls, data, "QuantSpec field")
        values = dict(data)
        if "keep_8bit" in values and not isinstance(values["keep_8bit"], str):
            values["keep_8bit"] = tuple(values["keep_8bit"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ZSQError(f"QuantSpec JSON is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ZSQError(f"QuantSpec JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def parse(cls, label: str, **overrides: Any) -> QuantSpec:
        """``QuantSpec.parse("W4A4")``: the standard setting at the given bit widths."""
        text = label.strip().upper()
        if not (text.startswith("W") and "A" in text):
            raise ValueError(f"expected a label such as 'W4A4', got {label!r}")
        weight, _, act = text[1:].partition("A")
        if not (weight.isdigit() and act.isdigit()):
            raise ValueError(f"expected a label such as 'W4A4', got {label!r}")
        return cls(weight_bits=int(weight), act_bits=int(act), **overrides)
