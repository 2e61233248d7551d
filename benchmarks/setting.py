"""The quantization setting of the benchmark pages: the literature's.

BRECQ, QDrop and Genie report the first conv and the last linear layer with full 8-bit
weights. The library's default (``QuantSpec.overflow_fix``) gives those layers 7-bit weights
so that int8 kernels compute what the simulation does on every x86 CPU; the pages keep the
papers' setting so that they compare with them, and say so.
"""

from __future__ import annotations

from zsq_plugins import QuantSpec

LITERATURE = {"overflow_fix": False}
"""QuantSpec fields of every benchmark page (the grids' ``[grid.quant]`` table holds the same)."""


def literature_spec(label: str) -> QuantSpec:
    """``QuantSpec.parse(label)`` in the literature's setting."""
    return QuantSpec.parse(label, **LITERATURE)
