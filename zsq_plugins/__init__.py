"""zsq-plugins: zero-shot post-training quantization for existing quantization toolkits."""

from zsq_plugins import zoo
from zsq_plugins.api import ApplyReport, apply
from zsq_plugins.errors import (
    CacheMismatchError,
    ChecksumMismatchError,
    DatasetNotFoundError,
    DuplicatePluginError,
    MissingDependencyError,
    ToolkitOptionError,
    UnknownPluginError,
    UnsupportedModelError,
    ZSQError,
)
from zsq_plugins.evaluation import EvalResult, evaluate
from zsq_plugins.input_spec import InputSpec
from zsq_plugins.layers import Normalize
from zsq_plugins.reconstruction import reconstruct
from zsq_plugins.saving import export_onnx, load_quantized, save_quantized
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry
from zsq_plugins.synthesis import SyntheticDataset, calibration_loader, synthesize

__version__ = "0.1.0"

__all__ = [
    "ApplyReport",
    "CacheMismatchError",
    "ChecksumMismatchError",
    "DatasetNotFoundError",
    "DuplicatePluginError",
    "EvalResult",
    "Granularity",
    "InputSpec",
    "MissingDependencyError",
    "Normalize",
    "QuantSpec",
    "Symmetry",
    "SyntheticDataset",
    "ToolkitOptionError",
    "UnknownPluginError",
    "UnsupportedModelError",
    "ZSQError",
    "__version__",
    "apply",
    "calibration_loader",
    "evaluate",
    "export_onnx",
    "load_quantized",
    "reconstruct",
    "save_quantized",
    "synthesize",
    "zoo",
]
