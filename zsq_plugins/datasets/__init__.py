"""Data sets: Fashion-MNIST, image folders, labelled ImageNet folders, and the labelled sample
images of foolbox."""

from zsq_plugins.datasets.fmnist import calibration_subset, fashion_mnist
from zsq_plugins.datasets.imagefolder import ImageFolder, load_image
from zsq_plugins.datasets.imagenet import ImageNetSamples, imagenet_split, imagenet_wnids
from zsq_plugins.datasets.samples import labelled_samples, samples_dir

__all__ = [
    "ImageFolder",
    "ImageNetSamples",
    "calibration_subset",
    "fashion_mnist",
    "imagenet_split",
    "imagenet_wnids",
    "labelled_samples",
    "load_image",
    "samples_dir",
]
