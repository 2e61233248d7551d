"""The Sony MCT generation script (benchmarks/mct_generation.py): its images reach the zoo
model as the pixels MCT meant, and it says how to get MCT where MCT is missing. (MCT itself
lives in an environment of its own, never the test suite's.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mct_generation.py"


def _script():
    spec = importlib.util.spec_from_file_location("mct_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mct_space_maps_to_the_zoo_models_pixels():
    """MCT's KERAS_APPLICATIONS space is pixel / 127.5 - 1 for pixels 0..255; the zoo's
    ImageNet models take pixel / 255. The wrapped model must see exactly those."""
    script = _script()
    pixels = torch.arange(256, dtype=torch.float64)
    mct_space = pixels / 127.5 - 1
    assert torch.allclose(script.to_pixels(mct_space), pixels / 255)
    assert torch.allclose(script.FromMCTSpace(torch.nn.Identity())(mct_space), pixels / 255)


def test_without_mct_it_says_how_to_get_it(capsys):
    if importlib.util.find_spec("model_compression_toolkit") is not None:
        pytest.skip("MCT is installed in this environment")
    with pytest.raises(SystemExit):
        _script().main(["--iterations", "1", "--out", "unused"])
    assert "make mct-venv" in capsys.readouterr().err
