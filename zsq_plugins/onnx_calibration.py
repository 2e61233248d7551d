"""Calibration data in ONNX Runtime's form: a ``CalibrationDataReader`` over any of our data.

``onnxruntime.quantization.quantize_static`` (and AMD Quark's ONNX flow, which takes the same
reader) pulls calibration inputs one ``get_next()`` at a time as ``{input name: array}``
dicts. ``OnnxCalibrationReader`` serves them from synthetic images (``synthesize``), a
Dataset, a DataLoader or a tensor, without importing onnxruntime: ORT's
``CalibrationDataReader`` recognizes any class with a ``get_next`` method as one of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def _images(batch: Any) -> torch.Tensor:
    images = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"calibration data must yield image tensors or (images, ...) tuples, got "
            f"{type(images).__name__}"
        )
    return images


class OnnxCalibrationReader:
    """Batches of ``data`` as ``{input_name: float32 array (N, C, H, W)}``, for
    ``quantize_static(model_in, model_out, reader, ...)``.

    ``data`` is a tensor of images, a Dataset (of images or ``(image, label)`` pairs, such as a
    ``SyntheticDataset``) or a DataLoader; at most ``num_samples`` images are served, in
    batches of ``batch_size`` (a DataLoader keeps its own batches). ``input_name`` is the ONNX
    model's input (``InferenceSession(path).get_inputs()[0].name``). The reader can be
    rewound (``rewind()``) and restricted to a range of batches (``set_range``), as ORT's
    calibrators ask of it.
    """

    def __init__(
        self,
        data: torch.Tensor | Dataset | DataLoader,
        input_name: str,
        *,
        batch_size: int = 1,
        num_samples: int | None = None,
    ) -> None:
        if not isinstance(input_name, str) or not input_name:
            raise ValueError(f"input_name must be the ONNX model's input name, got {input_name!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.input_name = input_name
        self.batches = self._batches(data, batch_size, num_samples)
        if not self.batches:
            raise ValueError("the calibration data hold no image")
        self.start, self.end = 0, len(self.batches)
        self.position = 0

    @staticmethod
    def _batches(
        data: torch.Tensor | Dataset | DataLoader, batch_size: int, limit: int | None
    ) -> list[np.ndarray]:
        if isinstance(data, torch.Tensor):
            chunks: Iterator[Any] = iter(data.split(batch_size))
        elif isinstance(data, DataLoader):
            chunks = iter(data)
        elif isinstance(data, Dataset):
            chunks = iter(DataLoader(data, batch_size=batch_size, shuffle=False))
        else:
            raise TypeError(
                f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}"
            )
        batches, left = [], limit
        for batch in chunks:
            images = _images(batch)
            if left is not None:
                images = images[:left]
                left -= len(images)
            if len(images):
                batches.append(images.detach().to("cpu", torch.float32).contiguous().numpy())
            if left is not None and left <= 0:
                break
        return batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None after the last one (ORT's end-of-data signal)."""
        if self.position >= self.end:
            return None
        batch = self.batches[self.position]
        self.position += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        """Starts again from the first batch of the current range."""
        self.position = self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serves batches ``start_index`` to ``end_index - 1`` only, from the first of them."""
        if not 0 <= start_index <= end_index <= len(self.batches):
            raise ValueError(
                f"range [{start_index}, {end_index}) is outside the {len(self.batches)} batches"
            )
        self.start, self.end = start_index, end_index
        self.position = start_index

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item
