"""A grid of query images and their nearest neighbours in the backbone's feature space (cosine similarity).

    python -m fastcl.viz neighbors --checkpoint runs/mocov2_r50/checkpoint.pth --data cifar10 [--k 8 --queries 8]

The bank is a fixed seeded subset of ``--samples`` training images (CIFAR-10's training split; for a folder:
``PATH/train`` in the ImageNet layout, a folder of class folders, or any folder of images, unlabeled), embedded
with the eval transform the kNN monitor uses (the same features). ``--queries`` images are drawn from the bank;
each row shows the query's ``k + 1`` most similar bank images in order: the first is the query itself
(cosine 1.00 -- a check that the features and the ranking are sane), then its ``k`` nearest other images, each
with its class where the data has labels and its cosine similarity.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["nearest_neighbors", "bank", "neighbors_figure", "run"]


@torch.no_grad()
def nearest_neighbors(feats: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (Q, k+1), cosines (Q, k+1))``: for each bank row ``queries[i]``, the ``k + 1`` rows of ``feats``
    (N, D) most cosine-similar to it, most similar first (the row itself included, so column 0 is the query
    unless an identical image precedes it)."""
    f = F.normalize(feats.float(), dim=1)
    sims = f[queries] @ f.T  # (Q, N)
    s, j = sims.topk(min(k + 1, f.shape[0]), dim=1)
    return j, s


class _Files(torch.utils.data.Dataset):
    """Images at any depth of a folder, unlabeled: (transform(img), -1, i)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from ..data.imagefolder import load_rgb

        return self.transform(load_rgb(self.paths[i])), -1, i


def bank(data: str, transform, samples: int, seed: int = 0):
    """``(dataset of (x, label or -1, index), class names or None, thumbnail(i) -> uint8 HxWx3)`` for ``data``:
    'cifar10' (training split) or a folder (``PATH/train`` ImageNet layout, class folders, or any images)."""
    import numpy as np

    if data == "cifar10":
        from ..data.cifar10 import CIFAR10_CLASSES, load_cifar10
        from ..data.datasets import ArrayDataset

        images, labels = load_cifar10(split="train")
        ds, classes = ArrayDataset(images, labels, transform), list(CIFAR10_CLASSES)

        def thumb(i):
            return np.asarray(images[i])
    else:
        from PIL import Image, ImageOps

        from ..data.imagefolder import ImageFolderDataset, load_rgb, scan_images

        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder (expected 'cifar10' or an image folder)")
        root = root / "train" if (root / "train").is_dir() else root
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        flat = [p for p in root.iterdir() if p.is_file()]
        if subdirs and not any(p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") for p in flat):
            ds = ImageFolderDataset(root, transform)
            classes, paths = ds.classes, [p for p, _ in ds.samples]
        else:
            paths, _ = scan_images(root)
            if not paths:
                raise ValueError(f"--data {data}: no image files under {root}")
            ds, classes = _Files(paths, transform), None

        def thumb(i):
            return np.asarray(ImageOps.fit(load_rgb(paths[i]), (96, 96), Image.BICUBIC))
    n = len(ds)
    if samples and samples < n:  # a fixed seeded subset, in dataset order
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values.tolist()
        ds = torch.utils.data.Subset(ds, order)
    else:
        order = list(range(n))
    return ds, classes, (lambda j: thumb(order[j]))


def neighbors_figure(thumbs, idx, sims, labels, classes, title: str = ""):
    """One row per query: column 0 the query (= its own nearest neighbour), then its neighbours; titles give
    the class (where known) and the cosine similarity to the query."""
    from .common import pyplot

    plt = pyplot()
    Q, K = idx.shape
    fig, axes = plt.subplots(Q, K, figsize=(1.05 * K, 1.2 * Q), squeeze=False)
    for r in range(Q):
        q = int(idx[r, 0])
        for c in range(K):
            j = int(idx[r, c])
            ax = axes[r, c]
            ax.imshow(thumbs(j), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            name = classes[labels[j]] if classes is not None and labels[j] >= 0 else ""
            head = "query" if c == 0 else f"{sims[r, c]:.3f}"
            ax.set_title(f"{head} {name}".strip(), fontsize=6, pad=2,
                         color=("black" if c == 0 or classes is None or labels[j] == labels[q] else "firebrick"))
            if c == 0:
                for s in ax.spines.values():
                    s.set_edgecolor("royalblue")
                    s.set_linewidth(2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97 if title else 1))
    return fig


def run(checkpoint: str | Path, data: str = "cifar10", k: int = 8, queries: int = 8, samples: int = 2000,
        seed: int = 0, out: str | Path | None = None, batch_size: int = 256, workers: int = 0) -> dict:
    """Draw the grid; returns ``{"png", "queries" (Q,) bank rows, "neighbors" (Q, k+1), "cosines" (Q, k+1),
    "labels" (N,), "feats" (N, D)}``."""
    from ..data.transforms import eval_transform
    from ..eval.knn import extract_features
    from . import model
    from .common import out_dir, save

    for name, v, low in (("--k", k, 1), ("--queries", queries, 1), ("--samples", samples, 0),
                         ("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    bb = model.load(checkpoint)
    resize = None if data == "cifar10" and bb.size == 32 else (bb.size if data == "cifar10" else int(bb.size * 256 / 224))
    ds, classes, thumbs = bank(data, eval_transform(bb.size, bb.mean, bb.std, resize=resize), samples, seed)
    if queries > len(ds):
        raise ValueError(f"--queries {queries} is more than the {len(ds)} images in the bank")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = extract_features(bb.net, loader, "cpu", progress="neighbors: features")
    q = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 1))[:queries]
    idx, sims = nearest_neighbors(feats, q, k)
    fig = neighbors_figure(thumbs, idx, sims, labels.tolist(), classes,
                           title=f"{Path(checkpoint).name}: {bb.arch}, nearest of {len(ds)} "
                                 f"{'CIFAR-10 train' if data == 'cifar10' else Path(data).name} images (cosine)")
    d = out_dir(out, Path(checkpoint).resolve().parent)
    name = "cifar10" if data == "cifar10" else Path(data).name
    png = save(fig, d / f"neighbors_{name}.png", dpi=80)
    return {"png": png, "queries": q, "neighbors": idx, "cosines": sims, "labels": labels, "feats": feats}
