"""fastcl data layer: augmentation spec, torchvision transforms, datasets, sharded loader, CIFAR-10."""
from .augment import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, ViewSpec)
from .cifar10 import CIFAR10_CLASSES, cifar10_imagefolder, load_cifar10, prepare_cifar10
from .datasets import ArrayDataset
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset
from .loader import TorchLoader, shard_batches
from .transforms import MultiViewTransform, build_view_transform, eval_transform

__all__ = [
    "AugmentSpec", "ViewSpec", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD",
    "CIFAR10_CLASSES", "load_cifar10", "cifar10_imagefolder", "prepare_cifar10",
    "ArrayDataset", "ImageFolderDataset", "IMG_EXTENSIONS",
    "TorchLoader", "shard_batches",
    "MultiViewTransform", "build_view_transform", "eval_transform",
]
