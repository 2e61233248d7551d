"""Resuming an interrupted reconstruction from the last finished block.

A ``paper`` budget runs 20k steps per block: hours on a CPU. With a checkpoint folder, the
routine saves after every block what the next blocks depend on: the toolkit model's state
(its weights, now on the grid, and every quantizer's step), the random generator's state (the
next block's minibatches and QDrop masks) and the finished blocks' reports. A run given the
same folder, the same kind of toolkit model, configuration, seed and images, loads that state
and goes on with the next block; its result equals an uninterrupted run's.

The folder holds ``progress.json`` and ``state-<blocks done>.safetensors``. Each is written
through a temporary file and a rename, the state first, so an interruption leaves the
previous consistent pair. Nothing is read with pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zsq_plugins.checksums import sha256_of
from zsq_plugins.errors import CacheMismatchError, ChecksumMismatchError
from zsq_plugins.reconstruction.config import same_result_fields
from zsq_plugins.reporting import library_versions, write_json

log = logging.getLogger(__name__)

FORMAT = "zsq-reconstruction-checkpoint/1"
PROGRESS = "progress.json"
GENERATOR_KEY = "__zsq_generator_state__"


def images_fingerprint(images: torch.Tensor) -> str:
    """sha256 of the calibration images' values, shape and dtype."""
    digest = hashlib.sha256(f"{tuple(images.shape)} {images.dtype}".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def state_layout(model: nn.Module) -> dict[str, list[Any]]:
    """Every state entry's shape and dtype: which toolkit model a checkpoint fits."""
    return {
        key: [list(value.shape), str(value.dtype)]
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def checkpoint_identity(
    config: Mapping[str, Any],
    seed: int,
    images: torch.Tensor,
    blocks: Sequence[str],
    model: nn.Module,
) -> dict[str, Any]:
    """What a checkpoint must have been written for to be resumed (as JSON stores it: tuples
    become lists, so that a stored identity compares equal)."""
    identity = {
        "format": FORMAT,
        "config": dict(config),
        "seed": seed,
        "images_sha256": images_fingerprint(images),
        "blocks": list(blocks),
        "state_layout": state_layout(model),
    }
    return json.loads(json.dumps(identity))


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    described = {
        "images_sha256": "other calibration images",
        "state_layout": "another toolkit model (its state entries differ)",
        "blocks": "another model (its blocks differ)",
    }
    found = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "config" and isinstance(old, dict) and isinstance(new, dict):
            found += [f"config.{d}" for d in _differences(old, new)]
        else:
            found.append(described.get(key) or f"{key}: stored {old!r}, now {new!r}")
    return found


def _state_name(blocks_done: int) -> str:
    return f"state-{blocks_done:04d}.safetensors"


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity with its configuration reduced to the fields that decide the result
    (config.same_result_fields): a checkpoint saved with its block inputs on disk resumes in
    memory, and one saved before a field was added resumes at the field's old value."""
    config = identity.get("config")
    if not isinstance(config, dict):
        return identity
    return {**identity, "config": same_result_fields(config)}


class ReconstructionCheckpoint:
    """The checkpoint folder of one reconstruction run."""

    def __init__(self, root: str | os.PathLike[str], identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.identity = identity

    def _progress(self) -> dict[str, Any] | None:
        path = self.root / PROGRESS
        if not path.is_file():
            return None
        try:
            progress = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CacheMismatchError(
                f"{path} is not valid JSON ({error}): the folder holds no usable reconstruction "
                "checkpoint. Delete the folder to start over, or choose another one."
            ) from error
        if not isinstance(progress, dict) or progress.get("identity", {}).get("format") != FORMAT:
            raise CacheMismatchError(
                f"{path} is not a {FORMAT} file; delete the folder or choose another one."
            )
        if _comparable(progress["identity"]) != _comparable(self.identity):
            diff = "; ".join(_differences(progress["identity"], self.identity))
            raise CacheMismatchError(
                f"{self.root} holds the checkpoint of another reconstruction ({diff}). Use "
                "another checkpoint folder, or delete this one to start over."
            )
        return progress

    def restore(self, model: nn.Module, generator: torch.Generator) -> list[dict[str, Any]]:
        """Loads the saved state into ``model`` and ``generator``; returns the finished
        blocks' reports (as dicts), or [] when there is nothing to resume."""
        progress = self._progress()
        if progress is None or not progress["blocks"]:
            return []
        path = self.root / progress["state_file"]
        if not path.is_file() or sha256_of(path) != progress["state_sha256"]:
            raise ChecksumMismatchError(
                f"{path} is missing or does not match the sha256 recorded in {PROGRESS}: the "
                "checkpoint cannot be resumed. Delete the folder to start over."
            )
        state = load_file(str(path))
        generator.set_state(state.pop(GENERATOR_KEY))
        model.load_state_dict(state, strict=True)
        log.info(
            "resumed from %s: %d of %d blocks done",
            self.root,
            len(progress["blocks"]),
            len(self.identity["blocks"]),
        )
        return progress["blocks"]

    def save(self, model: nn.Module, generator: torch.Generator, reports: Sequence[Any]) -> None:
        """Saves the state after ``reports`` (BlockReport dataclasses) are finished."""
        self.root.mkdir(parents=True, exist_ok=True)
        state = {
            key: value.detach().cpu().contiguous().clone()  # clones: no shared storage
            for key, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)
        }
        state[GENERATOR_KEY] = generator.get_state()
        path = self.root / _state_name(len(reports))
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        write_json(
            self.root / PROGRESS,
            {
                "identity": self.identity,
                "versions": library_versions(("torch", "safetensors", "zsq-plugins")),
                "blocks": [dataclasses.asdict(r) for r in reports],
                "state_file": path.name,
                "state_sha256": sha256_of(path),
            },
        )
        for old in self.root.glob("state-*.safetensors"):
            if old.name != path.name:
                old.unlink()
