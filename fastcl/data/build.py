"""The one place that turns (data source, augmentation spec, back end, process) into loaders.

Sources (``source_kind``): ``"cifar10"`` (in memory, fetched and cached on first use); a folder in the ImageNet
layout (``train/<class>/*``, ``val/<class>/*``: labeled); any other folder (its images at any depth) or a text
file listing image paths (``fastcl.data.unlabeled``: no labels). Back ends:

- ``gpu``: the whole in-memory dataset on the training device, views augmented there (``fastcl.data.gpu``);
  for in-memory sources only (CIFAR-10).
- ``dali``: NVIDIA DALI (GPU decode on CUDA, its CPU operators otherwise), for image folders, CIFAR-10's
  JPEG copy and tar shards (``fn.readers.webdataset``: ``fastcl.data.dali.DaliShardLoader``).
- ``torch``: torchvision transforms in DataLoader workers; the only one taking ``train_samples`` for folders.
- ``auto``: ``gpu`` for CIFAR-10 on CUDA; else DALI when installed (and no ``train_samples``, ``workers`` > 0, no tar
  shards); else torch.

The monitor's loaders come from here too: kNN on labeled data (the training source, or ``eval_data``):
device-resident for CIFAR-10 on the ``gpu`` back end, torchvision otherwise (the same eval transform, so the same
features); on unlabeled data without ``eval_data``, a ``LabelFree`` loader of training images for RankMe and the
embedding std (``fastcl.eval.rankme``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, AugmentSpec

if TYPE_CHECKING:
    from ..engine.distributed import DistInfo

BACKENDS = ("auto", "gpu", "dali", "torch")
IN_MEMORY = ("cifar10",)


SOURCE_HELP = ("cifar10, an ImageNet-layout folder (train/<class>/*, val/<class>/*), a folder of images at any depth "
               "(no labels) or a text file listing image paths")


def source_kind(source: str, flag: str = "--data") -> str:
    """``"memory"`` (CIFAR-10), ``"imagefolder"`` (a folder with ``train/``: labeled), ``"folder"`` (any other
    folder: its images at any depth, unlabeled), ``"list"`` (a text file of image paths, unlabeled) or ``"shards"``
    (WebDataset tar shards, ``PATH/shard-{000000..000099}.tar``: no val split, so no kNN without --eval-data).

    Raises:
        FileNotFoundError: ``source`` is neither a known name nor an existing file or folder (named as ``flag``).
        ValueError: ``source`` is one image file.
    """
    if source in IN_MEMORY:
        return "memory"
    from .shards import is_shard_source

    if is_shard_source(source):
        return "shards"
    path = Path(source)
    if path.is_dir():
        return "imagefolder" if (path / "train").is_dir() else "folder"
    if path.is_file():
        from .imagefolder import IMG_EXTENSIONS

        if path.suffix.lower() in IMG_EXTENSIONS:
            raise ValueError(f"{flag} {source}: one image file; {flag} takes {SOURCE_HELP}")
        return "list"
    takes = SOURCE_HELP if flag == "--data" else "cifar10 or an ImageNet-layout folder (train/<class>/*, val/<class>/*)"
    raise FileNotFoundError(f"{flag} {source}: no such file or folder ({flag} takes {takes})")


def has_labels(source: str) -> bool:
    return source_kind(source) in ("memory", "imagefolder")


def dataset_stats(source: str) -> tuple[tuple, tuple]:
    """(mean, std) used to normalize ``source``'s images."""
    return (CIFAR10_MEAN, CIFAR10_STD) if source == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def resolve_backend(source: str, backend: str, device: torch.device, train_samples: int = 0,
                    workers: int | None = None) -> str:
    """The back end ``auto`` stands for here, or ``backend`` itself after checking it can serve ``source``.
    ``workers=0`` (the bit-exact setting of the torchvision back end) keeps ``auto`` off DALI, which needs
    threads."""
    if backend not in BACKENDS:
        raise ValueError(f"--data-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from .dali import dali_available

    if backend == "gpu" and source not in IN_MEMORY:
        raise ValueError(f"--data-backend gpu holds an in-memory dataset ({', '.join(IN_MEMORY)}) on the device; "
                         f"--data {source} is an image folder: use --data-backend dali or torch")
    if backend == "dali" and not dali_available():
        raise ValueError("--data-backend dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    if backend == "dali" and train_samples:
        raise ValueError("--train-samples works with --data-backend torch or gpu only")
    if backend == "dali" and workers == 0:
        raise ValueError("--data-backend dali needs --workers >= 1 (its CPU threads); --workers 0 is for the "
                         "torchvision back end (--data-backend torch)")
    if backend != "auto":
        return backend
    if source in IN_MEMORY and device.type == "cuda":
        return "gpu"
    # DALI whenever installed (GPU decode on CUDA, its CPU operators otherwise: 1.5-2x torchvision's img/s on
    # CIFAR-10 on a 2-core CPU); --train-samples subsets and --workers 0 are torchvision-path settings. Tar shards
    # stay on torchvision, which decodes every sample itself and substitutes any undecodable one; DALI substitutes
    # only those its header check finds and stops the run at one that passes it (opt in).
    from .shards import is_shard_source

    return "dali" if dali_available() and not train_samples and workers != 0 and not is_shard_source(source) \
        else "torch"


def _subset_indices(n: int, k: int) -> np.ndarray | None:
    """A fixed random subset of ``k`` of ``n`` samples (0 = all), the same on every rank and run."""
    if not k or k >= n:
        return None
    return np.random.default_rng(0).permutation(n)[:k]


def subset(ds, k: int):
    idx = _subset_indices(len(ds), k)
    return ds if idx is None else torch.utils.data.Subset(ds, idx.tolist())


def train_root(source: str) -> Path:
    """The image folder DALI reads for a labeled ``source`` (CIFAR-10: its JPEG copy, written once)."""
    if source == "cifar10":
        from .cifar10 import cifar10_imagefolder

        return cifar10_imagefolder() / "train"
    return Path(source) / "train"


def train_files(source: str):
    """What DALI reads for ``source``: the labeled ``train_root`` folder, or the unlabeled dataset (its files)."""
    if has_labels(source):
        return train_root(source)
    from .unlabeled import UnlabeledImageDataset

    return UnlabeledImageDataset(source)


def num_train_samples(source: str) -> int:
    """The number of training samples of ``source`` (dataset indices stay below it: memory banks size with it)."""
    if source == "cifar10":
        return 50_000
    if source_kind(source) == "shards":
        from .shards import ShardIndex

        return len(ShardIndex(source))
    files = train_files(source)
    if isinstance(files, Path):
        from .imagefolder import ImageFolderDataset

        files = ImageFolderDataset(files)
    return len(files)


def _arrays(source: str, split: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from .cifar10 import load_cifar10

    images, labels = load_cifar10(split="train" if split == "train" else "test")
    idx = _subset_indices(len(images), k)
    return (images, labels) if idx is None else (images[idx], labels[idx])


def dataset(source: str, split: str, transform):
    """A map-style dataset of ``source``'s ``split`` ("train" or "val") with ``transform``."""
    if source in IN_MEMORY:
        from .datasets import ArrayDataset

        return ArrayDataset(*_arrays(source, split), transform)
    if source_kind(source) in ("folder", "list"):
        if split != "train":
            raise ValueError(f"--data {source} has no labels, so no {split} split: give labeled data for the kNN "
                             "monitor with --eval-data cifar10|PATH (PATH in the ImageNet layout)")
        from .unlabeled import UnlabeledImageDataset

        return UnlabeledImageDataset(source, transform)
    from .imagefolder import ImageFolderDataset, find_classes

    root, train = Path(source) / split, Path(source) / "train"
    for r in dict.fromkeys((train, root)):  # (train first: val's labels need it)
        if not r.is_dir():
            raise FileNotFoundError(f"--data {source}: no {r.name}/ folder at {r} (expected the ImageNet layout "
                                    f"{source}/train/<class>/*.jpg and {source}/val/<class>/*.jpg)")
    # val labels follow train's class order (a val split missing a class must not shift the labels)
    classes = None if split == "train" else find_classes(train)
    return ImageFolderDataset(root, transform, classes=classes)


def build_train_loader(source: str, spec: AugmentSpec, backend: str, dist: DistInfo, *, batch_size: int,
                       workers: int, seed: int = 0, train_samples: int = 0, channels_last: bool = True):
    """The training loader yielding ``(views, labels, indices)`` of ``spec``, sharded over the ranks.
    ``batch_size`` is global; each rank gets ``batch_size / world_size``."""
    per_rank = batch_size // dist.world_size
    if per_rank * dist.world_size != batch_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {dist.world_size} processes")
    backend = resolve_backend(source, backend, dist.device, train_samples, workers)
    cl = dist.device.type == "cuda" and channels_last
    if backend == "gpu":
        from .gpu import DeviceLoader

        images, labels = _arrays(source, "train", train_samples)
        return DeviceLoader(images, labels, spec, per_rank, device=dist.device, rank=dist.rank,
                            world_size=dist.world_size, seed=seed, channels_last=cl,
                            out_dtype=torch.bfloat16 if dist.device.type == "cuda" else torch.float32)
    if backend == "dali" and source_kind(source) == "shards":
        from .dali import DaliShardLoader

        return DaliShardLoader(source, spec, per_rank, rank=dist.rank, world_size=dist.world_size, seed=seed,
                               num_threads=workers, device=dist.device, channels_last=cl)
    if backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(train_files(source), spec, per_rank, rank=dist.rank, world_size=dist.world_size, seed=seed,
                          num_threads=workers, device=dist.device, channels_last=cl)
    from .loader import TorchLoader
    from .transforms import MultiViewTransform

    if source_kind(source) == "shards":
        if train_samples:
            raise ValueError("--train-samples does not apply to tar shards (they are streamed); list fewer shards")
        from .shards import ShardLoader

        return ShardLoader(source, MultiViewTransform(spec), per_rank, rank=dist.rank, world_size=dist.world_size,
                           seed=seed, num_workers=workers, pin_memory=dist.device.type == "cuda")
    return TorchLoader(subset(dataset(source, "train", MultiViewTransform(spec)), train_samples), per_rank,
                       rank=dist.rank, world_size=dist.world_size, seed=seed, num_workers=workers,
                       pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0)


# Images the label-free monitor embeds when --knn-samples is 0 (all): RankMe's paper evaluates on 25,600.
LABEL_FREE_SAMPLES = 25_600


def build_knn_loaders(source: str, dist: DistInfo, size: int, *, knn_samples: int = 0, workers: int = 2,
                      backend: str = "auto", eval_data: str | None = None):
    """The monitor's loaders. Labeled data -- ``eval_data`` (``cifar10`` or an ImageNet-layout folder) if given,
    else ``source`` when it has labels: (train, val) loaders with the eval transform for kNN, ``knn_samples`` train
    images (0 = all) and a fifth as many val images, device-resident when the training data is (the ``gpu`` back
    end). Unlabeled ``source`` and no ``eval_data``: ``LabelFree(loader)`` over ``knn_samples`` training images
    (0: ``LABEL_FREE_SAMPLES``) for RankMe. Images are normalized with the training source's statistics."""
    mean, std = dataset_stats(source)
    if eval_data is None and not has_labels(source):
        from ..eval.rankme import LabelFree
        from .loader import TorchLoader
        from .transforms import eval_transform

        tf = eval_transform(size, mean, std, resize=int(size * 256 / 224))
        if source_kind(source) == "shards":  # the first shards holding the monitor's images, streamed in order
            from .shards import ShardIndex, ShardLoader

            index = ShardIndex(source).head(knn_samples or LABEL_FREE_SAMPLES)
            bs = max(1, min(256, len(index) // dist.world_size))
            sl = ShardLoader(source, tf, bs, rank=dist.rank, world_size=dist.world_size, num_workers=workers,
                             shuffle_buffer=1, index=index)
            return LabelFree(sl, len(sl) * bs * dist.world_size)
        ds = subset(dataset(source, "train", tf), knn_samples or LABEL_FREE_SAMPLES)
        return LabelFree(TorchLoader(ds, 256, rank=dist.rank, world_size=dist.world_size, shuffle=False,
                                     drop_last=False, num_workers=workers), len(ds))
    if eval_data is not None:
        if source_kind(eval_data, "--eval-data") not in ("memory", "imagefolder"):
            raise ValueError(f"--eval-data {eval_data}: the kNN monitor needs labels: cifar10 or a folder in the "
                             "ImageNet layout (train/<class>/*, val/<class>/*)")
        source = eval_data
    if source in IN_MEMORY and resolve_backend(source, backend, dist.device, workers=workers) == "gpu" and size == 32:
        from .gpu import DeviceEvalLoader

        return tuple(DeviceEvalLoader(*_arrays(source, split, n), mean, std, 1024, device=dist.device,
                                      rank=dist.rank, world_size=dist.world_size)
                     for split, n in (("train", knn_samples), ("val", knn_samples // 5)))
    from .loader import TorchLoader
    from .transforms import eval_transform

    tf = eval_transform(size, mean, std, resize=None if source in IN_MEMORY else int(size * 256 / 224))
    return tuple(TorchLoader(subset(dataset(source, split, tf), n), 256, rank=dist.rank, world_size=dist.world_size,
                             shuffle=False, drop_last=False, num_workers=workers)
                 for split, n in (("train", knn_samples), ("val", knn_samples // 5)))


MAX_LISTED = 1000  # file names listed per kind in result.json (the counts are exact)


def data_report(loader, dist: DistInfo | None = None) -> dict:
    """What ``result.json`` records about the training files, over all ranks: ``{"data": {"num_bad_files": N,
    "bad_files": [...], "num_skipped_files": M, "skipped_files": [...]}}`` -- bad files: image files that could
    not be decoded (each substituted by the next good sample, see ``fastcl.data.imagefolder``), distinct files
    found by any rank; skipped files: files the scan left out as not images. Lists sorted, at most
    ``MAX_LISTED`` names each. ``{}`` for loaders without files (in-memory data). Collective under DDP."""
    report = loader.bad_file_report() if hasattr(loader, "bad_file_report") else None
    if dist is not None and dist.world_size > 1:
        import torch.distributed as tdist

        reports = [None] * dist.world_size
        tdist.all_gather_object(reports, report)
    else:
        reports = [report]
    reports = [r for r in reports if r is not None]
    if not reports:
        return {}
    out = {}
    for kind in ("bad_files", "skipped_files"):
        names = sorted({p for r in reports for p in r[kind]})
        out[f"num_{kind}"] = len(names)
        out[kind] = names[:MAX_LISTED]
    return {"data": out}
