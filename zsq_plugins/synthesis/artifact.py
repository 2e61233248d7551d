"""Synthetic data sets as artifacts: safetensors shards plus a JSON manifest.

A set is a folder: ``manifest.json`` and one ``shard-NNNNN.safetensors`` per generated batch.
Every file is written atomically (temporary file + rename), so an interrupted run leaves only
whole shards, and a later run with the same identity (model fingerprint, preset, config, seed,
batch schedule) reuses them. Nothing is read with pickle.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from zsq_plugins.checksums import sha256_of
from zsq_plugins.errors import CacheMismatchError, ChecksumMismatchError
from zsq_plugins.reporting import library_versions, write_json

log = logging.getLogger(__name__)

FORMAT = "zsq-synthetic/1"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` (a file, or a folder holding manifest.json), or None."""
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CacheMismatchError(
            f"{path} is not valid JSON ({error}); the folder does not hold a usable synthetic "
            "data set. Delete it or choose another folder."
        ) from error
    if not isinstance(manifest, dict) or manifest.get("identity", {}).get("format") != FORMAT:
        raise CacheMismatchError(
            f"{path} is not a {FORMAT} manifest; delete the folder or choose another one."
        )
    return manifest


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}: stored {old.get(key)!r}, requested {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


class ShardStore:
    """The folder of one synthetic set being generated (or reused).

    In a distributed run (``world > 1``) each rank records its progress in its own
    ``manifest.rank<R>.json``, so that ranks never write the same file; ``merge`` (rank 0,
    after a barrier) writes the complete ``manifest.json`` and removes the rank files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        identity: dict[str, Any],
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.root = Path(root)
        self.identity = identity
        self.rank, self.world = rank, world
        self.root.mkdir(parents=True, exist_ok=True)
        self.progress_path = self.root / (MANIFEST if world == 1 else rank_manifest_name(rank))
        self.shards = self._verified_records()
        self._write(self.progress_path, complete=False)

    def _manifests(self) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for path in [self.root / MANIFEST, *sorted(self.root.glob("manifest.rank*.json"))]:
            manifest = _read_manifest(path)
            if manifest is None:
                continue
            if manifest["identity"] != self.identity:
                diff = "; ".join(_differences(manifest["identity"], self.identity))
                raise CacheMismatchError(
                    f"{self.root} holds a synthetic set made differently ({diff}). Use another "
                    "cache folder, or delete this one to regenerate."
                )
            found.append((path, manifest))
        return found

    def _verified_records(self) -> dict[int, dict[str, Any]]:
        shards: dict[int, dict[str, Any]] = {}
        for _, manifest in self._manifests():
            for record in manifest.get("shards", []):
                path = self.root / record["file"]
                if path.is_file() and sha256_of(path) == record["sha256"]:
                    shards[record["index"]] = record
                else:
                    log.warning("%s is missing or corrupted; its batch will be regenerated", path)
        return shards

    def finished(self) -> set[int]:
        return set(self.shards)

    def write_shard(self, index: int, images: torch.Tensor, record: dict[str, Any]) -> None:
        path = self.root / shard_name(index)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"images": images.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        self.shards[index] = {
            "index": index,
            "file": path.name,
            "sha256": sha256_of(path),
            "size": len(images),
            **record,
        }
        self._write(self.progress_path, complete=False)

    def complete(self, extra: Mapping[str, Any]) -> None:
        """Single process: marks the set complete. Distributed: call ``merge`` on rank 0."""
        if self.world == 1:
            self.merge(extra)

    def merge(self, extra: Mapping[str, Any]) -> None:
        """Writes the complete manifest from every rank's records; removes the rank files."""
        self.shards = self._verified_records()
        self._write(self.root / MANIFEST, complete=True, extra=extra)
        for path in self.root.glob("manifest.rank*.json"):
            path.unlink()

    def _write(self, path: Path, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        manifest = {
            "identity": self.identity,
            "complete": complete,
            "versions": library_versions(("torch", "safetensors", "zsq-plugins")),
            "shards": [self.shards[i] for i in sorted(self.shards)],
            **(extra or {}),
        }
        write_json(path, manifest)


class SyntheticDataset(Dataset[torch.Tensor]):
    """Synthetic images (N, C, H, W) in the model's input space, with their manifest."""

    def __init__(self, images: torch.Tensor, manifest: dict[str, Any]) -> None:
        self.images = images
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["identity"]["model_fingerprint"]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the set as a folder (one shard per generated batch, and the manifest)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        shards = []
        start = 0
        for record in self.manifest.get("shards", [{"index": 0, "size": len(self.images)}]):
            chunk = self.images[start : start + record["size"]]
            start += record["size"]
            file = root / shard_name(record["index"])
            tmp = file.with_name(f".{file.name}.tmp")
            save_file({"images": chunk.contiguous()}, str(tmp))
            os.replace(tmp, file)
            shards.append({**record, "file": file.name, "sha256": sha256_of(file)})
        write_json(root / MANIFEST, {**self.manifest, "shards": shards, "complete": True})

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: torch.nn.Module | None = None
    ) -> SyntheticDataset:
        """Reads a saved set, verifying every shard's SHA-256, and that it was made for
        ``model`` when one is given."""
        from zsq_plugins.synthesis.model_info import model_fingerprint

        root = Path(path)
        manifest = _read_manifest(root)
        if manifest is None:
            raise CacheMismatchError(f"{root} holds no {MANIFEST}; it is not a synthetic set")
        if not manifest.get("complete"):
            raise CacheMismatchError(
                f"{root} holds an unfinished set; finish it by calling synthesize(...) again "
                "with cache_dir pointing to it"
            )
        if model is not None:
            fingerprint = model_fingerprint(model)
            if fingerprint != manifest["identity"]["model_fingerprint"]:
                raise CacheMismatchError(
                    f"{root} was made for another model (fingerprint "
                    f"{manifest['identity']['model_fingerprint'][:12]}..., this model's is "
                    f"{fingerprint[:12]}...); generate data for this model instead"
                )
        chunks = []
        for record in manifest["shards"]:
            file = root / record["file"]
            if not file.is_file() or sha256_of(file) != record["sha256"]:
                raise ChecksumMismatchError(
                    f"{file} is missing or does not match its recorded SHA-256; the set is "
                    "corrupted. Regenerate it (synthesize with this folder as cache_dir "
                    "regenerates only the damaged batches)."
                )
            chunks.append(load_file(str(file))["images"])
        return cls(torch.cat(chunks), manifest)
