"""Running one block of a toolkit's quantized model on cached block inputs.

While a block learns, everything before it is fixed, so the value that enters the block is a
function of the image alone. Recomputing that prefix on every step costs more than the block
itself on deep blocks (the last block of ResNet-20 runs the whole network for one linear
layer). ``BlockRunner`` computes the block's input once per calibration image, then on every
step runs the toolkit's model on a single image, and at the block's first layer swaps that
one-image tensor, in place, for the cached batch. Swapping the tensor object itself (not the
argument) matters: a residual block reads the same tensor through its skip connection.

A model's Python code may still read the prefix in ways the swap cannot reach (a layer of the
block that runs before its first layer, a reshape that hard-codes the batch), and a quantizer
the block learns may run before its first layer (a toolkit that quantizes a normalization in
front of the stem), which would make the cached value stale. The runner checks both once, by
watching the block's quantizers while it caches and by comparing the replay with a full
forward pass on one batch, and otherwise runs the prefix on every step: a model is never
reconstructed on wrong inputs.
"""

from __future__ import annotations

import enum
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from zsq_plugins.capture import capture_at, plain_tensor, run_to

log = logging.getLogger(__name__)


AUTO_MEMORY_LIMIT = 2**30
"""Bytes of block inputs up to which ``auto`` keeps them in RAM (1 GiB); above, on disk."""


class BlockInputCache(str, enum.Enum):
    AUTO = "auto"
    """``memory`` while one block's inputs for every calibration image fit in
    ``AUTO_MEMORY_LIMIT`` bytes, ``disk`` above: 1,024 images of a 224 px CNN's early blocks
    (112 x 112 x 96 floats each) would hold 4.6 GiB."""
    MEMORY = "memory"
    """Block inputs of every calibration image held in RAM."""
    DISK = "disk"
    """Block inputs in a memory-mapped temporary file: RAM holds one batch at a time."""
    OFF = "off"
    """No cache: the prefix runs on every step (least memory, slowest)."""


def _mapped_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, directory: Path | None
) -> torch.Tensor:
    """A zero-filled tensor backed by a memory-mapped file that is unlinked at once: the
    kernel pages it out as needed and nothing is left behind, even by a killed process."""
    handle, name = tempfile.mkstemp(prefix="zsq-block-inputs-", suffix=".bin", dir=directory)
    try:
        numel = int(torch.Size(shape).numel())
        os.ftruncate(handle, numel * torch.empty((), dtype=dtype).element_size())
        return torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(handle)
        os.unlink(name)


def cache_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    cache: BlockInputCache,
    directory: Path | None = None,
) -> torch.Tensor:
    """An uninitialized tensor to hold one value per calibration image, in RAM or (``disk``,
    or ``auto`` above ``AUTO_MEMORY_LIMIT`` bytes) in a memory-mapped temporary file."""
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    on_disk = cache is BlockInputCache.DISK or (
        cache is BlockInputCache.AUTO and size > AUTO_MEMORY_LIMIT
    )
    return _mapped_tensor(shape, dtype, directory) if on_disk else torch.empty(shape, dtype=dtype)


class BlockRunner:
    """Runs the toolkit's ``model`` on images ``index`` up to ``point`` (None: the output),
    through the block that starts at ``first_layer``."""

    def __init__(
        self,
        model: nn.Module,
        first_layer: str,
        point: str | None,
        images: torch.Tensor,
        batch_size: int,
        cache: BlockInputCache | str = BlockInputCache.MEMORY,
        cache_dir: Path | None = None,
        block_quantizers: Sequence[nn.Module] = (),
        inputs: torch.Tensor | None = None,
        verify: bool = True,
    ) -> None:
        """``inputs``: the block's input for every image, already computed (by the runner of
        the block before, replaying to this block's first layer in chunks of ``batch_size``),
        so the prefix never runs on all images; the replay is still checked, and chained
        inputs pass the check bit for bit only when every runner uses the same chunks (a
        quantized model's float rounding depends on the batch size, and where a quantizer's
        rounding lands the other way, whole steps do). ``verify=False`` skips the check, for
        a point inside a block whose replay to a later point was checked."""
        self.model, self.first_layer, self.point = model, first_layer, point
        self.images = images
        self.cache = BlockInputCache(cache)
        self.inputs: torch.Tensor | None = None
        if self.cache is not BlockInputCache.OFF:
            if block_quantizers and self._learned_before_first_layer(block_quantizers):
                log.info("block at %r learns a quantizer of its input: no cache", first_layer)
                return
            self.inputs = self._cache_inputs(batch_size, cache_dir) if inputs is None else inputs
            if verify and not self._replay_matches(batch_size):
                # Expected, not an error: layer by layer, a conv inside a residual block has
                # a skip connection that reads a tensor from before it.
                log.info(
                    "block at %r: replaying cached inputs differs from a full forward pass "
                    "(it reads other tensors of the prefix); running the prefix on every step",
                    first_layer,
                )
                self.close()

    @property
    def replays(self) -> bool:
        """Whether steps run on cached inputs (False: the prefix runs every time)."""
        return self.inputs is not None

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.inputs is None:
            with capture_at(self.model, self.point) as store:
                return run_to(self.model, self.images[index], store)
        batch = self.inputs[index.cpu()].to(self.images.device)
        if self.point == self.first_layer:  # the cached value itself
            return batch
        with capture_at(self.model, self.point) as store, self._swap_in(batch):
            return run_to(self.model, self.images[index[:1]], store)

    def values(self, batch_size: int, cache_dir: Path | None = None) -> torch.Tensor:
        """The value at ``point`` for every image, in chunks of ``batch_size``, held like a
        block input cache (RAM, or a memory-mapped file above ``AUTO_MEMORY_LIMIT``): the next
        block's inputs when ``point`` is its first layer."""
        chunks = range(0, len(self.images), batch_size)
        device = self.images.device
        with torch.no_grad():
            first = self(torch.arange(min(batch_size, len(self.images)), device=device))
            shape = (len(self.images), *first.shape[1:])
            cache = BlockInputCache.AUTO if self.cache is BlockInputCache.OFF else self.cache
            values = cache_tensor(shape, first.dtype, cache, cache_dir)
            values[: len(first)] = first.detach().cpu()
            for start in chunks[1:]:
                index = torch.arange(start, min(start + batch_size, len(self.images)))
                values[start : start + len(index)] = self(index.to(device)).detach().cpu()
        return values

    def close(self) -> None:
        """Releases the cache (a disk cache's file is already unlinked; this unmaps it)."""
        self.inputs = None

    def _learned_before_first_layer(self, quantizers: Sequence[nn.Module]) -> bool:
        ran: list[bool] = []
        hooks = [q.register_forward_hook(lambda *_: ran.append(True)) for q in quantizers]
        try:
            with torch.no_grad(), capture_at(self.model, self.first_layer) as store:
                run_to(self.model, self.images[:1], store)
        finally:
            for hook in hooks:
                hook.remove()
        return bool(ran)

    def _cache_inputs(self, batch_size: int, cache_dir: Path | None) -> torch.Tensor:
        # Chunks of the training batch size, so that the check in _replay_matches compares
        # the block on bit-identical inputs (a kernel's result may depend on the batch size).
        chunks = range(0, len(self.images), batch_size)
        with torch.no_grad(), capture_at(self.model, self.first_layer) as store:
            first = run_to(self.model, self.images[:batch_size], store).detach()
            shape = (len(self.images), *first.shape[1:])
            inputs = cache_tensor(shape, first.dtype, self.cache, cache_dir)
            inputs[: len(first)] = first.cpu()
            for start in chunks[1:]:
                value = run_to(self.model, self.images[start : start + batch_size], store)
                inputs[start : start + len(value)] = value.detach().cpu()
        return inputs

    def _replay_matches(self, batch_size: int) -> bool:
        index = torch.arange(min(batch_size, len(self.images)), device=self.images.device)
        with torch.no_grad():
            with capture_at(self.model, self.point) as store:
                exact = run_to(self.model, self.images[index], store).detach().clone()
            try:
                replayed = self(index)
            except RuntimeError as error:  # e.g. a swapped tensor that is a view
                log.info("replay failed at %r: %s", self.first_layer, error)
                return False
        return replayed.shape == exact.shape and torch.allclose(
            replayed, exact, rtol=1e-5, atol=1e-6
        )

    @contextmanager
    def _swap_in(self, batch: torch.Tensor) -> Iterator[None]:
        def swap(_: nn.Module, args: tuple) -> None:
            value = plain_tensor(args[0])
            with torch.no_grad():
                value.set_(batch.to(value.dtype))

        hook = self.model.get_submodule(self.first_layer).register_forward_pre_hook(swap)
        try:
            yield
        finally:
            hook.remove()
