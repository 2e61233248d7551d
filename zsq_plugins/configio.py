"""JSON round trip and checked replacement for the frozen configuration dataclasses."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, TypeVar

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


def checked_replace(config: T, what: str, **overrides: Any) -> T:
    """``dataclasses.replace`` that names unknown fields and lists the valid ones."""
    names = [field.name for field in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options: {', '.join(names)}")
    return dataclasses.replace(config, **overrides)


class Budget(str, Enum):
    """How much compute a preset spends (synthesis iterations, reconstruction steps)."""

    PAPER = "paper"
    """What the paper used."""
    CPU = "cpu"
    """A budget chosen so that the whole zero-shot pipeline takes minutes on 2 CPU threads."""

    @classmethod
    def parse(cls, value: Budget | str) -> Budget:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"budget must be 'paper' or 'cpu', got {value!r}") from None
