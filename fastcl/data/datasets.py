"""Map-style datasets returning ``(transform(img), label, index)``.

``index`` is the position in the dataset (instance id for memory banks / kNN, and what the loader
shards). With a ``MultiViewTransform`` the first element is a list of view tensors, which the default
collate turns into a list of ``(B, C, H, W)`` tensors.

- ``ArrayDataset``: the fast in-memory path (CIFAR): uint8 NHWC array -> uint8 CHW tensor, no PIL.
- ``ImageFolderDataset`` (in ``fastcl.data.imagefolder``): JPEG folders (ImageNet layout).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .imagefolder import ImageFolderDataset  # noqa: F401  (re-export)


class ArrayDataset(Dataset):
    """In-memory images.

    Args:
        images: uint8 array ``(N, H, W, 3)`` (NHWC, RGB).
        labels: integer array ``(N,)``.
        transform: callable on a uint8 ``(3, H, W)`` tensor; ``None`` returns that tensor.

    >>> ds = ArrayDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    >>> x, y, i = ds[2]; tuple(x.shape), y, i
    ((3, 32, 32), 2, 2)
    """

    def __init__(self, images: np.ndarray, labels, transform: Callable | None = None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ArrayDataset expects NHWC images with 3 channels, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"ArrayDataset expects uint8 images, got {images.dtype}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))  # 3xHxW uint8
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index]), int(index)
