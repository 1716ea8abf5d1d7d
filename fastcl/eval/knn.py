"""Weighted k-nearest-neighbour classifier on frozen features (the InstDisc monitor).

Protocol of Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(https://arxiv.org/abs/1805.01978), as run by the DINO and MoCo repos (dino eval_knn.py ``knn_classifier``):
features are L2-normalized, each test image takes its k=200 most cosine-similar training images, and
neighbour j votes for its class with weight exp(s_j / T), T=0.1. The class with the largest summed
weight is the prediction; top-5 ranks the class totals.

Under ``torch.distributed`` every rank extracts features for its own shard of the data; the shards are
gathered in dataset-index order (duplicates from a padded DistributedSampler dropped), each rank then
classifies a contiguous slice of the test rows against the full training bank and the correct counts
are summed, so all ranks return the same numbers.

    >>> res = knn_eval(backbone, train_loader, val_loader, torch.device("cuda"))  # doctest: +SKIP
    >>> res["top1"], res["top5"]                                                  # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["extract_features", "knn_classify", "knn_eval"]

# Test rows per chunk are chosen so one (chunk, N_train) similarity block holds about this many floats
# (2^26 fp32 = 256 MiB): ImageNet's 1.28M training rows give 52-row chunks, CIFAR's 50k give 1342.
_SIM_BLOCK_ELEMS = 1 << 26


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ============ feature extraction ============
@torch.no_grad()
def _gather_padded(x: torch.Tensor) -> torch.Tensor:
    """all_gather for per-rank tensors whose dim 0 differs: pad to the longest, gather, trim, concatenate."""
    world = _dist_world()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    pad = max(counts) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts)])


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device | str,
                     amp_dtype: torch.dtype | None = None, progress: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` over ``loader``; return ``(feats (N, D) float32, labels (N,) int64)`` on ``device``.

    Args:
        backbone: images (B, 3, H, W) -> features (B, D). Put in eval mode for the pass; its previous
            train/eval mode is restored afterwards (also on error).
        loader: yields ``(images, labels, indices)``; ``images`` may be a list of views (the first is used).
            ``indices`` are dataset positions: rows come back sorted by them, each index once. On a single
            process ``(images, labels)`` batches are accepted too (rows then keep loader order).
        device: where the forward pass runs and where the features are kept.
        amp_dtype: run the forward under ``torch.autocast`` with this dtype (features are cast to fp32).
        progress: a progress-bar label (minutes of silence otherwise on large sets); ``None``: no bar.

    Under an initialized process group the features of all ranks are gathered (padded all_gather, so
    ranks may hold different counts) and every rank returns the full, deduplicated, index-ordered set.

    Raises:
        ValueError: distributed run whose loader yields no indices (the ranks' rows cannot be merged).
    """
    device = torch.device(device)
    world = _dist_world()
    was_training = backbone.training
    backbone.eval()
    feats, labels, indices = [], [], []
    seen = 0
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(loader) if hasattr(loader, "__len__") else None, desc=progress, unit="batch",
                   leave=False, mininterval=2.0)
    try:
        for batch in loader:
            if bar is not None:
                bar.update(1)
            images, target = batch[0], batch[1]
            if isinstance(images, (list, tuple)):
                images = images[0]
            if len(batch) > 2:
                index = torch.as_tensor(batch[2])
            elif world > 1:
                raise ValueError("extract_features under torch.distributed needs a loader yielding "
                                 "(images, labels, indices) to put the ranks' features in dataset order")
            else:
                index = torch.arange(seen, seen + len(target))
            seen += len(target)
            images = images.to(device, non_blocking=True)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with ctx:
                f = backbone(images)
            feats.append(f.float())
            labels.append(torch.as_tensor(target).to(device, torch.long))
            indices.append(index.to(device, torch.long))
    finally:
        backbone.train(was_training)
        if bar is not None:
            bar.close()
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    feats, labels, indices = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    if world > 1:
        feats, labels, indices = _gather_padded(feats), _gather_padded(labels), _gather_padded(indices)
    # dataset-index order, first copy of each index (DistributedSampler pads by repeating samples)
    if bool((indices[1:] > indices[:-1]).all()):  # already ordered and unique: skip the gather copy
        return feats, labels
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    order = order[keep]
    return feats[order], labels[order]


# ============ weighted kNN vote ============
@torch.no_grad()
def _knn_counts(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                test_labels: torch.Tensor, k: int, T: float, num_classes: int,
                chunk: int | None, normalized: bool = False) -> torch.Tensor:
    """Return ``[top1_correct, top5_correct]`` (float64) for the test rows given.

    ``normalized=True``: ``train_feats`` already has unit rows in fp32/fp64 and is used as is (no copy).
    """
    dtype = torch.promote_types(train_feats.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 kept
    train = train_feats if normalized else F.normalize(train_feats.to(dtype), dim=1)  # (N, D)
    train_labels = train_labels.to(train.device, torch.long)
    n_train, n_test = train.shape[0], test_feats.shape[0]
    k = min(k, n_train)
    top = min(5, num_classes)
    if chunk is None:
        chunk = max(1, _SIM_BLOCK_ELEMS // max(n_train, 1))
    correct = torch.zeros(2, dtype=torch.float64, device=train.device)
    # fp32 similarities even when called under the trainer's autocast: bf16 cosines (8-bit mantissa)
    # would reorder near neighbours and perturb exp(s / T) by up to ~4% at T=0.1.
    with torch.autocast(train.device.type, enabled=False):
        for i in range(0, n_test, chunk):
            _vote_chunk(train, train_labels, test_feats[i:i + chunk], test_labels[i:i + chunk], k, T,
                        num_classes, top, correct)
    return correct


def _vote_chunk(train: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                test_labels: torch.Tensor, k: int, T: float, num_classes: int, top: int,
                correct: torch.Tensor) -> None:
    """Add this chunk's top-1 / top-``top`` hits to ``correct``; ``train`` is already L2-normalized."""
    q = F.normalize(test_feats.to(train.device, train.dtype), dim=1)  # (c, D)
    y = test_labels.to(train.device, torch.long)  # (c,)
    sim = q @ train.T  # (c, N) cosine similarities
    s, j = sim.topk(k, dim=1)  # (c, k) the k nearest training rows
    w = (s / T).exp_()  # (c, k) vote weights exp(s_j / T)
    votes = torch.zeros(q.shape[0], num_classes, device=train.device, dtype=w.dtype)
    votes.scatter_add_(1, train_labels[j], w)  # (c, C) summed weight per class
    pred = votes.topk(top, dim=1).indices  # (c, top)
    correct[0] += (pred[:, 0] == y).sum()
    correct[1] += (pred == y[:, None]).any(dim=1).sum()


def _check(k: int, T: float, chunk: int | None) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, T: float = 0.1, num_classes: int | None = None,
                 chunk: int | None = None, progress: bool = False) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 accuracy of ``test_feats`` against the bank ``train_feats``.

    Args:
        train_feats: (N, D) training features (need not be normalized; they are L2-normalized here).
        train_labels: (N,) int class ids.
        test_feats, test_labels: (M, D), (M,).
        k: neighbours per query (default: 200; capped at N).
        T: temperature of the vote weights exp(cos / T) (default: 0.1).
        num_classes: default: 1 + the largest label seen in either split.
        chunk: test rows per similarity block; default: as many as keep a (chunk, N) block near 2^26
            elements (256 MiB fp32). Results do not depend on it.

    Returns:
        ``{"top1": float, "top5": float}`` fractions in [0, 1] (top-5 = top-C when C < 5 classes).

    >>> f = torch.eye(3).repeat(4, 1); y = torch.arange(3).repeat(4)
    >>> knn_classify(f, y, f, y, k=4)["top1"]
    1.0
    """
    _check(k, T, chunk)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    c = _knn_counts(train_feats, train_labels, test_feats, test_labels, k, T, num_classes, chunk)
    n = max(test_feats.shape[0], 1)
    return {"top1": float(c[0]) / n, "top5": float(c[1]) / n}


@torch.no_grad()
def knn_eval(backbone: nn.Module, train_loader, val_loader, device: torch.device | str, k: int = 200,
             T: float = 0.1, amp_dtype: torch.dtype | None = None, num_classes: int | None = None,
             chunk: int | None = None, progress: bool = False) -> dict[str, float]:
    """Extract train/val features with ``backbone`` and return the weighted-kNN ``{"top1", "top5"}``.

    Collective under ``torch.distributed``: every rank must call it; the test rows are split across
    ranks and the correct counts all-reduced, so each rank returns the same result.
    """
    _check(k, T, chunk)
    train_feats, train_labels = extract_features(backbone, train_loader, device, amp_dtype,
                                                 "kNN: train features" if progress else None)
    test_feats, test_labels = extract_features(backbone, val_loader, device, amp_dtype,
                                               "kNN: val features" if progress else None)
    # normalize the bank in place: it is ours, and an out-of-place copy would double its memory
    # (ImageNet-1k x ResNet-50: 1.28M x 2048 fp32 = 10.5 GB)
    train_feats /= train_feats.norm(dim=1, keepdim=True).clamp_min_(1e-12)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    world = _dist_world()
    rank, n_test = (dist.get_rank() if world > 1 else 0), test_feats.shape[0]
    lo, hi = n_test * rank // world, n_test * (rank + 1) // world  # this rank's slice of the test rows
    counts = _knn_counts(train_feats, train_labels, test_feats[lo:hi], test_labels[lo:hi], k, T, num_classes,
                         chunk, normalized=True)
    if world > 1:
        dist.all_reduce(counts)
    n = max(n_test, 1)
    return {"top1": float(counts[0]) / n, "top5": float(counts[1]) / n}
