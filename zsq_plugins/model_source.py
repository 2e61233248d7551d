"""Where an FP model comes from, as a string a command line, a grid config or a saved
manifest can hold: a zoo name, ``path/to/file.py:factory`` or ``package.module:factory``,
with an optional weights file (safetensors, or a PyTorch checkpoint read with
``weights_only=True``: never unpickled)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from zsq_plugins.errors import UnsupportedModelError


def _factory(reference: str) -> object:
    """The callable named by ``path/to/file.py:name`` or ``package.module:name``."""
    location, _, attribute = reference.rpartition(":")
    if not location or not attribute:
        raise UnsupportedModelError(
            f"{reference!r} names no factory; write path/to/file.py:factory or "
            "package.module:factory (a zoo name has no colon)"
        )
    if location.endswith(".py"):
        path = Path(location).expanduser().resolve()
        if not path.is_file():
            raise UnsupportedModelError(f"no Python file {path} (from {reference!r})")
        name = f"zsq_user_model_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None  # a .py file always has a loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle-free tracing look modules up
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # the user's file: report whatever it raised
            del sys.modules[name]
            raise UnsupportedModelError(
                f"{path} raised {type(error).__name__} while being imported: {error}"
            ) from error
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise UnsupportedModelError(
                f"cannot import {location!r} (from {reference!r}): {error}"
            ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        available = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UnsupportedModelError(
            f"{location} has no callable {attribute!r}; it defines: {', '.join(available)}"
        )
    return factory


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a PyTorch checkpoint without unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnsupportedModelError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsupportedModelError(
            f"{path} needs pickle to load (it holds more than tensors: {error}), and a "
            "checkpoint from elsewhere is never unpickled here. Save its state dict "
            "instead (torch.save(model.state_dict(), ...), or safetensors.torch.save_file)."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedModelError(f"{path} holds no state dict of tensors")
    return state


def load_model(source: str, weights: str | Path | None = None) -> nn.Module:
    """The FP model ``source`` names (a zoo name, or a factory reference), in eval mode, with
    ``weights`` loaded strictly when given."""
    if ":" not in source:
        from zsq_plugins import zoo

        model = zoo.load(source)
    else:
        factory = _factory(source)
        try:
            model = factory()  # type: ignore[operator]
        except Exception as error:  # the user's factory: report whatever it raised
            raise UnsupportedModelError(
                f"{source} raised {type(error).__name__}: {error}"
            ) from error
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"{source} returned {type(model).__name__}, not a torch.nn.Module"
            )
    if weights is not None:
        try:
            result = model.load_state_dict(read_weights(weights), strict=False)
        except RuntimeError as error:  # shapes that differ
            raise UnsupportedModelError(f"{weights} does not fit {source}: {error}") from None
        if result.missing_keys or result.unexpected_keys:
            raise UnsupportedModelError(
                f"{weights} does not fit {source}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]} (of {len(result.missing_keys)} "
                f"missing, {len(result.unexpected_keys)} unexpected)"
            )
    return model.eval()
