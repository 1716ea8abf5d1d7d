"""The loader protocol the engine consumes, and its torch DataLoader implementation.

Sharding (``shard_batches``): every epoch draws one permutation of ``range(N)`` from a generator
seeded with ``seed + epoch`` -- identical on all ranks -- and rank ``r`` takes ``perm[r::world_size]``
(the ``DistributedSampler`` convention), cut into batches of ``batch_size``.

- ``drop_last=True`` (training): the permutation is first truncated to
  ``world_size * batch_size * (N // (world_size * batch_size))`` so every rank gets the same number of
  full batches; the dropped tail differs every epoch. Within an epoch each kept sample is seen exactly
  once across ranks.
- ``drop_last=False`` (evaluation): nothing is dropped and nothing is padded: every sample is seen
  exactly once across ranks, the last batch of a rank may be partial, and rank batch counts may differ
  by one. (Gather eval results with that in mind: no duplicated samples to de-duplicate, but an uneven
  number of collective calls if you all_gather per batch.)

Resume: ``set_epoch(epoch, start_batch=k)`` skips the first ``k`` batches' *indices* (nothing is
decoded), so the iterator yields exactly batches ``k..len-1`` of the uninterrupted epoch (same
samples, same order). Augmentation randomness is not replayed. ``start_batch`` applies to the next
iteration only.

Augmentation RNG: with ``num_workers > 0`` the workers' seeds derive from ``(seed, epoch, rank)``
(and are fixed once for ``persistent_workers=True``); with ``num_workers=0`` transforms draw from the
main process's global torch RNG.

>>> from fastcl.data.datasets import ArrayDataset
>>> ds = ArrayDataset(np.zeros((10, 8, 8, 3), np.uint8), np.arange(10))
>>> dl = TorchLoader(ds, 4, num_workers=0)
>>> len(dl), [len(idx) for _, _, idx in dl]
(2, [4, 4])
"""
from __future__ import annotations

import gc
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader


def shard_batches(n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True, drop_last: bool = True) -> list[np.ndarray]:
    """This rank's batches of dataset indices for one epoch (see the module docstring)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + int(epoch))
        perm = torch.randperm(n, generator=g).numpy()
    else:
        perm = np.arange(n, dtype=np.int64)
    if drop_last:
        per_rank_batches = n // (world_size * batch_size)
        perm = perm[: per_rank_batches * world_size * batch_size]
    mine = perm[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


class EpochPosition:
    """The loader protocol's position, shared by every back end: ``set_epoch(epoch, start_batch)`` selects the
    epoch's order and skips ``start_batch`` batches of the next iteration (a mid-epoch resume)."""

    epoch: int = 0
    start_batch: int = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)


class _BatchSampler:
    """Batch sampler whose batch list the owning TorchLoader sets right before each iteration."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader(EpochPosition):
    """Sharded, resumable loader over a map-style dataset returning ``(x, label, index)``.

    Yields ``(views, labels, indices)``: ``views`` is a list of ``(B, C, H, W)`` tensors when the
    transform returns a list of views, else a single tensor; ``labels``/``indices`` are int64 ``(B,)``.

    Args:
        dataset: map-style dataset, ``dataset[i] -> (x, label, i)``.
        batch_size: per-rank batch size.
        rank, world_size: this process's shard.
        seed: base seed; epoch ``e`` uses permutation seed ``seed + e``.
        shuffle: permute every epoch (False: index order, for eval).
        drop_last: True = equal full batches on all ranks; False = every sample exactly once.
        num_workers, pin_memory, persistent_workers: passed to ``torch.utils.data.DataLoader``
            (``persistent_workers`` is ignored when ``num_workers == 0``).
    """

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, num_workers: int = 2,
                 pin_memory: bool = False, persistent_workers: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        if drop_last and len(self) == 0:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than one global batch "
                             f"({world_size} process(es) x {batch_size}): lower --batch-size")
        self._sampler = _BatchSampler()
        self._generator = torch.Generator()
        self._loader = DataLoader(dataset, batch_sampler=self._sampler, num_workers=num_workers,
                                  pin_memory=pin_memory, generator=self._generator,
                                  persistent_workers=persistent_workers and num_workers > 0)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        return shard_batches(len(self.dataset), self.batch_size, rank=self.rank, world_size=self.world_size,
                             seed=self.seed, epoch=epoch, shuffle=self.shuffle, drop_last=self.drop_last)

    def __len__(self) -> int:
        """Batches per epoch on this rank (not reduced by ``start_batch``)."""
        n, ws, bs = len(self.dataset), self.world_size, self.batch_size
        if self.drop_last:
            return n // (ws * bs)
        mine = len(range(self.rank, n, ws))
        return -(-mine // bs)

    def epoch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's index batches for ``epoch`` (default: the current one), ignoring ``start_batch``."""
        return self._batches(self.epoch if epoch is None else epoch)

    def bad_file_report(self) -> dict | None:
        """The dataset's undecodable and non-image files (``ImageFileDataset.bad_file_report``), or ``None`` for
        datasets without files."""
        ds = self.dataset
        while isinstance(ds, torch.utils.data.Subset):
            ds = ds.dataset
        return ds.bad_file_report() if hasattr(ds, "bad_file_report") else None

    def __iter__(self) -> Iterator[tuple]:
        self._sampler.batches = self._batches(self.epoch)[self.start_batch:]
        self.start_batch = 0
        # Worker base seed = first draw from this generator: distinct per (seed, epoch, rank).
        self._generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        if self._loader.num_workers > 0:
            # Forked workers inherit the parent's uncollected garbage; a DALI pipeline among it (e.g. from an
            # earlier DaliLoader) deadlocks in __del__ when the child's GC frees it (its threads are gone).
            gc.collect()
        for x, labels, indices in self._loader:
            yield x, labels, indices
