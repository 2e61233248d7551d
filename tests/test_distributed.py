"""Sharded generation: two CPU processes under torchrun (gloo) equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHAPE, zoo_style_bn_model
from zsq_plugins import synthesize

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zeroq", "genie"])
def test_two_processes_under_torchrun_equal_one(tmp_path, preset):
    folder = tmp_path / "set"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "distributed_worker.py"),
        str(folder),
        preset,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3, 4]
    assert not list(folder.glob("manifest.rank*.json"))
    torch.set_num_threads(1)
    single = synthesize(
        zoo_style_bn_model(),
        30,
        preset,
        seed=5,
        input_shape=SHAPE,
        iterations=6,
        batch_size=6,
        progress=False,
    )
    from zsq_plugins.synthesis import SyntheticDataset

    merged = SyntheticDataset.load(folder)
    assert torch.equal(merged.images, single.images)


def test_torchrun_without_cache_dir_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 0)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="cache_dir"):
        synthesize(zoo_style_bn_model(), 4, "noise", input_shape=SHAPE, progress=False)
