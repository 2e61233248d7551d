"""Data sets: Fashion-MNIST, image folders, and the labelled sample images of foolbox."""

from zsq_plugins.datasets.fmnist import calibration_subset, fashion_mnist
from zsq_plugins.datasets.imagefolder import ImageFolder, load_image
from zsq_plugins.datasets.samples import labelled_samples, samples_dir

__all__ = [
    "ImageFolder",
    "calibration_subset",
    "fashion_mnist",
    "labelled_samples",
    "load_image",
    "samples_dir",
]
