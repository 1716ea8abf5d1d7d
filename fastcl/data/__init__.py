"""fastcl data layer: augmentation spec, torchvision transforms, datasets, sharded loader, CIFAR-10.

Names are imported on first use (PEP 562), so ``from fastcl.data import augment`` -- what a recipe
needs to declare its views -- does not pull in torch: ``recipe --help`` answers without it.
"""
import importlib

_WHERE = {
    "augment": ("AugmentSpec", "ViewSpec", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD"),
    "cifar10": ("CIFAR10_CLASSES", "load_cifar10", "cifar10_imagefolder", "prepare_cifar10"),
    "datasets": ("ArrayDataset",),
    "imagefolder": ("ImageFolderDataset", "IMG_EXTENSIONS"),
    "loader": ("TorchLoader", "shard_batches"),
    "transforms": ("MultiViewTransform", "build_view_transform", "eval_transform"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
