"""The order of a comparison's rows and columns, shared by its tables and its plots."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zsq_plugins.spec import QuantSpec


def spec_order(label: str) -> tuple[int, int]:
    """Sort key putting specs from most to fewest bits (total, then activation bits), the
    order of every table row and plot axis."""
    spec = QuantSpec.parse(label)
    return -(spec.weight_bits + spec.act_bits), -spec.act_bits


def in_grid_order(values: Iterable[str], grid: Sequence[str] = ()) -> list[str]:
    """The distinct ``values``: those the grid lists first, in its order, then any others as
    they come. A column's place must not depend on which cells have finished: the grid's
    cells vary the toolkit fastest, so with the first spec's nncf cell still missing, first
    appearance would put nncf last. (Data sources vary slowest: rows keep their order.)"""
    present = dict.fromkeys(values)
    return [v for v in grid if v in present] + [v for v in present if v not in grid]
