"""Run by tests/test_distributed.py under torchrun: each rank generates its share."""

import sys

import torch

from tests.conftest import SHAPE, zoo_style_bn_model
from zsq_plugins import synthesize

torch.set_num_threads(1)
data = synthesize(
    zoo_style_bn_model(),
    30,
    sys.argv[2],
    seed=5,
    input_shape=SHAPE,
    iterations=6,
    batch_size=6,
    cache_dir=sys.argv[1],
    progress=False,
)
assert data.images.shape == (30, *SHAPE)
