"""JSON round trip and checked replacement for the frozen configuration dataclasses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from zsq_plugins.errors import ZSQError

T = TypeVar("T")


def to_json_dict(config: Any) -> dict[str, Any]:
    """The dataclass as JSON-ready values: enums by value, tuples as lists."""
    data = dataclasses.asdict(config)
    for key, value in data.items():
        if isinstance(value, Enum):
            data[key] = value.value
        elif isinstance(value, tuple):
            data[key] = list(value)
    return data


def check_fields(config: Any, data: Mapping[str, Any], what: str) -> None:
    """Raises ValueError naming the keys of ``data`` that are no field of the dataclass
    ``config`` (a class or an instance), and listing the valid ones: ``what`` names a key
    ("grid option" -> "unknown grid option(s) [...]; valid options: ...")."""
    names = [field.name for field in dataclasses.fields(config)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        noun = what.split()[-1]
        raise ValueError(f"unknown {what}(s) {unknown}; valid {noun}s: {', '.join(names)}")


def checked_replace(config: T, what: str, **overrides: Any) -> T:
    """``dataclasses.replace`` that names unknown fields and lists the valid ones."""
    check_fields(config, overrides, f"{what} option")
    return dataclasses.replace(config, **overrides)


def is_jsonable(value: Any) -> bool:
    """Whether JSON holds ``value`` as it is (toolkit objects, say, it does not)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``["iterations=50", "flip=true"]`` -> ``{"iterations": 50, "flip": True}``: the
    command line's KEY=VALUE options (JSON values; anything that is not JSON is a string)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ZSQError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


class Budget(str, Enum):
    """How much compute a preset spends (synthesis iterations, reconstruction steps)."""

    PAPER = "paper"
    """What the paper used."""
    CPU = "cpu"
    """A budget chosen so that the whole zero-shot pipeline takes minutes on 2 CPU threads
    for the Fashion-MNIST zoo models."""
    AUTO = "auto"
    """``cpu`` for models as cheap as the Fashion-MNIST zoo models; for costlier ones, fewer
    images and steps in proportion to the model's cost per image (zsq_plugins.budgets)."""

    @classmethod
    def parse(cls, value: Budget | str) -> Budget:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"budget must be 'auto', 'cpu' or 'paper', got {value!r}") from None
