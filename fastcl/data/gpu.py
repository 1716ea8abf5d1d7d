"""Device-resident data: a whole in-memory dataset (CIFAR-10: 150 MB of uint8) held on the training device once,
batches drawn and augmented there. No JPEG decoder, no CPU worker, no host->device copy per step.

``DeviceLoader`` speaks the engine's loader protocol (``len``, ``set_epoch(epoch, start_batch)``, iteration
yielding ``(views, labels, indices)``) with the same sharding as ``TorchLoader`` (``shard_batches``: one
permutation per epoch seeded with ``seed + epoch``, identical on all ranks, rank r takes ``perm[r::world]``,
drop_last), so every kept sample is seen exactly once per epoch across ranks. The epoch's index batches are
copied to the device once per epoch; a step only slices them.

Augmentation (``fastcl.data.gpu_augment.BatchAugment``) draws from a generator seeded per
``(seed, rank, epoch, batch)``: a run resumed mid-epoch (``set_epoch(e, start_batch=k)``) yields exactly the
views the uninterrupted run would have yielded from batch k on -- resume is bit-exact on this back end.

``DeviceEvalLoader`` yields the same arrays normalized for evaluation (the CIFAR eval transform is the identity
crop + normalize), in large batches, for the kNN monitor.

Both run on CPU tensors too (the tests use that), only slower.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import AugmentSpec
from .loader import EpochPosition, shard_batches


def _to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"device-resident data must be uint8 NHWC RGB images, got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
    return (torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(labels.astype(np.int64)).to(device))


class DeviceLoader(EpochPosition):
    """Training batches of ``spec``'s views, augmented on ``device``.

    Args:
        images: uint8 (N, H, W, 3) array; labels: (N,) ints. Copied to ``device`` once.
        spec: the views to produce. batch_size: per rank.
        rank, world_size, seed: sharding and randomness, as ``TorchLoader``.
        out_dtype, channels_last: the views' dtype and memory format (bf16 + channels_last for CUDA training).

    >>> dl = DeviceLoader(np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64), augment.mocov2_aug_plus(32), 16)
    >>> views, labels, idx = next(iter(dl)); [tuple(v.shape) for v in views]    # doctest: +SKIP
    [(16, 3, 32, 32), (16, 3, 32, 32)]
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int], spec: AugmentSpec, batch_size: int, *,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False):
        from .gpu_augment import BatchAugment

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.device = torch.device(device)
        self.images, self.labels = _to_device(images, labels, self.device)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.augment = BatchAugment(spec, out_dtype=out_dtype, channels_last=channels_last)
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"the training set has {len(self.images)} samples, fewer than one global batch "
                             f"({world_size} process(es) x {batch_size}): lower --batch-size")
        self._generator = torch.Generator(self.device)

    def __len__(self) -> int:
        return len(self.images) // (self.world_size * self.batch_size)

    def epoch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's index batches for ``epoch`` (default: the current one), as ``TorchLoader``'s."""
        return shard_batches(len(self.images), self.batch_size, rank=self.rank, world_size=self.world_size,
                             seed=self.seed, epoch=self.epoch if epoch is None else epoch)

    def _batch_seed(self, batch: int) -> int:
        return ((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.epoch) * 100_003 + batch

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        batches = self.epoch_indices()
        start, self.start_batch = self.start_batch, 0
        if start >= len(batches):
            return
        # one host->device copy per epoch; steps slice it on the device
        order = torch.from_numpy(np.stack(batches[start:])).to(self.device, non_blocking=True)
        for k, idx in enumerate(order, start):
            self._generator.manual_seed(self._batch_seed(k))
            views = self.augment(self.images[idx], self._generator)
            yield views, self.labels[idx], idx


class DeviceEvalLoader:
    """Evaluation batches ``(images, labels, indices)`` of device-resident images: (B, 3, H, W) normalized with
    ``mean``/``std`` (the CIFAR eval transform: no crop, no resize), every sample once, this rank's shard
    (``shard_batches`` without shuffling or dropping, as ``TorchLoader`` for evaluation)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], mean, std, batch_size: int = 1024, *,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 out_dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.images, self.labels = _to_device(images, labels, self.device)
        self.batch_size, self.rank, self.world_size, self.out_dtype = batch_size, rank, world_size, out_dtype
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._batches = shard_batches(len(self.images), batch_size, rank=rank, world_size=world_size,
                                      shuffle=False, drop_last=False)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for b in self._batches:
            idx = torch.from_numpy(b).to(self.device)
            x = self.images[idx].permute(0, 3, 1, 2).float().div_(255)
            yield ((x - self.mean) / self.std).to(self.out_dtype), self.labels[idx], idx
