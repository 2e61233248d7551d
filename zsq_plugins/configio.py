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
