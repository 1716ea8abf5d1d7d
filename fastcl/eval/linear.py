"""Offline linear probe: a BN-free linear classifier on the frozen backbone.

Protocol of MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722, main_lincls.py): frozen backbone in
eval mode, one ``nn.Linear`` initialized N(0, 0.01), SGD momentum 0.9, weight decay 0, lr 30 for a
ResNet-50 at batch 256, 100 epochs (cosine here), train aug RandomResizedCrop + flip, eval
Resize(256) + CenterCrop(224). ViTs follow DINO's eval_linear: lr 0.001 per 256 on the concatenated CLS
tokens of the last ``--n-last-blocks`` blocks (each through the final norm; DINO: 4 for ViT-S, 1 plus the
averaged patch tokens, ``--avgpool-patchtokens``, for ViT-B).

Several learning rates can be trained at once (``--lr 1 10 30``): each is its own linear head on the same
features, so one backbone pass serves them all (DINO v2 sweeps lrs the same way); the best head is
reported. Val features are extracted once (the eval transform is deterministic and the backbone frozen).
``--cache-features`` extracts the train features once too, with the eval transform (no augmentation):
the linear layer then trains in seconds on a CPU; it is the faster, slightly weaker variant of the protocol.

Launch:

    python -m fastcl.eval.linear --checkpoint runs/mocov2_r50/backbone.pth --data /data/imagenet --arch resnet50
    python -m fastcl.eval.linear --checkpoint runs/mocov2_r18/checkpoint.pth --data cifar10 --cache-features
    python -m fastcl.eval.linear --checkpoint backbone.pth --data cifar10 --cache-features \\
        --feature-cache runs/feats_r18.pt --lr 0.3 3 30 --epochs 50

``--checkpoint`` is anything ``fastcl.eval.export`` reads (training checkpoint, exported backbone, bare
state_dict); the backbone is built exactly as the export docs load it. Prints top-1 per epoch and writes
a JSON result (``--output``, default ``<checkpoint dir>/linear_<data>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.load import load_backbone as load_public_backbone
from .knn import extract_features

__all__ = ["LinearHeads", "ViTLinearFeatures", "default_lrs", "load_backbone", "train_linear", "cached_batches", "get_args_parser"]


# ============ arguments ============
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastcl linear probe", add_help=False)
    p.add_argument("--checkpoint", required=True, help="training checkpoint or exported backbone (see fastcl.eval.export)")
    p.add_argument("--data", required=True, help="'cifar10', or an ImageNet-layout folder with train/ and val/")
    p.add_argument("--arch", default=None, help="backbone name (default: the one recorded in the checkpoint)")
    p.add_argument("--epochs", type=int, default=100, help="(default: 100, as MoCo / DINO)")
    p.add_argument("--lr", type=float, nargs="+", default=None,
                   help="learning rate(s) per 256 samples, scaled by batch-size/256; several values train one "
                        "head each in the same pass (default: ResNet 30 (MoCo), ViT 0.001 (DINO); on cifar10 "
                        "a sweep: ResNet 1 10 30, ViT 0.001 0.01 0.1)")
    p.add_argument("--n-last-blocks", type=int, default=None,
                   help="ViTs: concatenate the CLS tokens of this many last blocks (default: DINO's, 4 for ViT-S "
                        "and smaller, 1 for ViT-B and larger)")
    p.add_argument("--avgpool-patchtokens", type=int, default=None, choices=[0, 1],
                   help="ViTs: also concatenate the last block's averaged patch tokens (default: DINO's, 1 for "
                        "ViT-B and larger, else 0)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (default: 0, as MoCo)")
    p.add_argument("--size", type=int, default=None, help="crop size (default: 32 on cifar10, else 224)")
    p.add_argument("--cache-features", action="store_true",
                   help="extract train features once (eval transform, no augmentation) and train on them: "
                        "fast, also on a CPU")
    p.add_argument("--feature-cache", default=None,
                   help="implies --cache-features: load the features from this file if it was written for "
                        "the same checkpoint, else extract and save them there")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype of the backbone pass (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    p.add_argument("--train-samples", type=int, default=0,
                   help="probe on a fixed random subset of this many train images (a quick try; default: 0 = all)")
    p.add_argument("--val-samples", type=int, default=0,
                   help="evaluate on a fixed random subset of this many val images (default: 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--output", default=None, help="result JSON (default: <checkpoint dir>/linear_<data>.json)")
    return p


def default_lrs(arch: str, data: str) -> list[float]:
    vit = not arch.removesuffix("_cifar").startswith("resnet")
    if data == "cifar10":  # no published protocol for these backbones: sweep a decade either side
        return [0.001, 0.01, 0.1] if vit else [1.0, 10.0, 30.0]
    return [0.001] if vit else [30.0]


# ============ model ============
class ViTLinearFeatures(nn.Module):
    """DINO eval_linear's ViT features: ``cat(CLS of the last n blocks (normed), [mean patch token])``.
    With n=1 and no patch average this is the timm model's own pooled output.

    >>> import timm; vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    >>> ViTLinearFeatures(vit, 4)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 768])
    """

    def __init__(self, vit: nn.Module, n_last_blocks: int = 4, avgpool_patchtokens: bool = False):
        super().__init__()
        if not 1 <= n_last_blocks <= len(vit.blocks):
            raise ValueError(f"--n-last-blocks must be in [1, {len(vit.blocks)}], got {n_last_blocks}")
        self.vit, self.n, self.avgpool = vit, n_last_blocks, avgpool_patchtokens
        self.num_features = vit.embed_dim * (n_last_blocks + int(avgpool_patchtokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        outs = []
        for i, blk in enumerate(v.blocks):
            x = blk(x)
            if i >= len(v.blocks) - self.n:
                outs.append(v.norm(x))
        feats = [o[:, 0] for o in outs]
        if self.avgpool:
            feats.append(outs[-1][:, v.num_prefix_tokens:].mean(1))
        return torch.cat(feats, dim=-1)


def vit_probe_defaults(vit: nn.Module) -> tuple[int, bool]:
    """DINO's eval_linear choice by width: ViT-S (384) and smaller 4 blocks, no patch average; larger 1 + avg."""
    return (4, False) if vit.embed_dim <= 384 else (1, True)


class LinearHeads(nn.Module):
    """``H`` independent BN-free linear classifiers on the same (B, D) features -> logits (H, B, C).

    >>> LinearHeads(512, 10, 3)(torch.randn(4, 512)).shape
    torch.Size([3, 4, 10])
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(self._head(dim, num_classes) for _ in range(num_heads))

    @staticmethod
    def _head(dim: int, num_classes: int) -> nn.Linear:
        """MoCo main_lincls init, done head by head so head i's weights do not depend on the head count."""
        h = nn.Linear(dim, num_classes)
        nn.init.normal_(h.weight, std=0.01)
        nn.init.zeros_(h.bias)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads])  # (H, B, C)


def load_backbone(checkpoint: str | Path, arch: str | None = None, n_last_blocks: int | None = None,
                  avgpool_patchtokens: bool | None = None) -> tuple[nn.Module, str, int]:
    """``(frozen backbone in eval mode, arch, feature dim)`` from any checkpoint export reads. ViTs come
    wrapped in ``ViTLinearFeatures`` (DINO's defaults unless given); ``n_last_blocks=1`` with no average
    gives the plain model."""
    net = load_public_backbone(checkpoint, arch).requires_grad_(False)
    arch = net.fastcl_arch
    if hasattr(net, "blocks") and hasattr(net, "embed_dim"):  # a timm ViT
        n, avg = vit_probe_defaults(net)
        n = n if n_last_blocks is None else n_last_blocks
        avg = avg if avgpool_patchtokens is None else bool(avgpool_patchtokens)
        if (n, avg) != (1, False):
            net = ViTLinearFeatures(net, n, avg).eval()
    return net, arch, int(net.num_features)


# ============ training ============
def cached_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   seed: int = 0) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Per-epoch shuffled mini-batches of cached features: ``epoch -> iterator of (f, y)``."""
    def epoch_batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(len(feats), generator=g).to(feats.device)
        for i in range(0, len(perm), batch_size):
            j = perm[i:i + batch_size]
            yield feats[j], labels[j]
    return epoch_batches


def image_batches(backbone: nn.Module, loader, device: torch.device,
                  amp_dtype: torch.dtype | None) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Per-epoch batches of features of freshly augmented images through the frozen backbone."""
    def epoch_batches(epoch: int):
        for images, y, *_ in loader:
            with torch.no_grad(), (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()):
                f = backbone(images.to(device, non_blocking=True))
            yield f.float(), y.to(device, non_blocking=True)
    return epoch_batches


@torch.no_grad()
def evaluate(heads: LinearHeads, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict:
    """Top-1 / top-5 of every head: ``{"top1": [H floats], "top5": [H floats]}``."""
    heads.eval()
    hits = torch.zeros(2, len(heads.heads), dtype=torch.float64)
    for i in range(0, len(feats), chunk):
        logits = heads(feats[i:i + chunk])  # (H, b, C)
        y = labels[i:i + chunk]
        pred = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, b, 5)
        hits[0] += (pred[..., 0] == y).sum(dim=1).cpu()
        hits[1] += (pred == y[:, None]).any(dim=-1).sum(dim=1).cpu()
    n = max(len(feats), 1)
    return {"top1": (hits[0] / n).tolist(), "top5": (hits[1] / n).tolist()}


def train_linear(train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], steps_per_epoch: int,
                 val_feats: torch.Tensor, val_labels: torch.Tensor, dim: int, num_classes: int,
                 lrs: list[float], epochs: int, batch_size: int, momentum: float = 0.9, wd: float = 0.0,
                 log: Callable[[str], None] | None = print, seed: int = 0) -> dict:
    """Train one linear head per lr (SGD, cosine to 0) and evaluate on the val features after each epoch.

    Args:
        train_batches: ``epoch -> iterable of (features (b, D), labels (b,))`` (``cached_batches`` or the
            backbone on augmented images); must yield ``steps_per_epoch`` batches.
        lrs: learning rates per 256 samples (each is scaled by ``batch_size / 256``).

    Returns:
        ``{"lrs", "top1", "top5" (final, per head), "best_lr", "best_top1", "best_top5", "history"}``.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning rates must be > 0, got {lrs}")
    from ..engine.optim import cosine_schedule

    torch.manual_seed(seed)
    heads = LinearHeads(dim, num_classes, len(lrs)).to(val_feats.device)
    scaled = [lr * batch_size / 256 for lr in lrs]
    optimizer = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads.heads, scaled)],
                                momentum=momentum, weight_decay=wd)
    total = epochs * steps_per_epoch
    lr_mult = cosine_schedule(1.0, 0.0, epochs, steps_per_epoch)  # precomputed, indexed by global step
    assert len(lr_mult) == total
    history, step = [], 0
    for epoch in range(epochs):
        # ============ one epoch of linear training ============
        heads.train()
        t0, loss_sum, n_batches = time.perf_counter(), torch.zeros(len(lrs)), 0
        for f, y in train_batches(epoch):
            if step >= total:
                raise ValueError(f"train_batches yielded more than steps_per_epoch={steps_per_epoch} batches")
            for g, lr in zip(optimizer.param_groups, scaled):
                g["lr"] = lr * lr_mult[step]
            logits = heads(f)  # (H, b, C)
            losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(lrs)), reduction="none")
            losses = losses.view(len(lrs), -1).mean(dim=1)  # (H,): the heads are independent
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            loss_sum += losses.detach().cpu()
            n_batches += 1
            step += 1
        if not torch.isfinite(loss_sum).all():
            raise FloatingPointError(f"linear probe: non-finite loss at epoch {epoch} for lrs "
                                     f"{[lr for lr, l in zip(lrs, loss_sum.tolist()) if not np.isfinite(l)]}; "
                                     "lower --lr")
        res = evaluate(heads, val_feats, val_labels)
        res.update(epoch=epoch, loss=(loss_sum / max(n_batches, 1)).tolist())
        history.append(res)
        if log:
            accs = "  ".join(f"lr {lr:g}: {a:.4f}" for lr, a in zip(lrs, res["top1"]))
            log(f"epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.1f}s)  top-1  {accs}")
    final = history[-1]
    best = int(np.argmax(final["top1"]))
    return {"lrs": list(lrs), "top1": final["top1"], "top5": final["top5"], "best_lr": lrs[best],
            "best_top1": final["top1"][best], "best_top5": final["top5"][best], "history": history}


# ============ data ============
def build_transforms(data: str, size: int):
    """(train: RandomResizedCrop + flip, eval: [Resize(size*256/224)] + CenterCrop) with the dataset's stats."""
    from torchvision.transforms import v2

    from ..data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
    from ..data.transforms import eval_transform

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if data == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return train, eval_transform(size, mean, std, resize=None if data == "cifar10" else int(size * 256 / 224))


def build_dataset(data: str, split: str, transform):
    """``split`` of cifar10 (in-memory ArrayDataset) or ``<data>/<split>`` ImageFolder; items (img, label, index)."""
    if data == "cifar10":
        from ..data.cifar10 import load_cifar10
        from ..data.datasets import ArrayDataset

        images, labels = load_cifar10(split="train" if split == "train" else "test")
        return ArrayDataset(images, labels, transform)
    from ..data.imagefolder import ImageFolderDataset, find_classes

    root = Path(data) / split
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: no {split}/ folder at {root} (expected {data}/train/<class>/*.jpg "
                                f"and {data}/val/<class>/*.jpg)")
    classes = None if split == "train" else find_classes(Path(data) / "train")  # train's label order
    return ImageFolderDataset(root, transform, classes=classes)


def subset(ds, n: int, seed: int):
    """A fixed random subset of ``n`` items of ``ds`` (the same for a given seed), or ``ds`` when n is 0 or
    covers it. Keeps ``classes`` so the class count is the dataset's, not the subset's."""
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    sub = torch.utils.data.Subset(ds, idx.tolist())
    sub.num_classes = _num_classes(ds)
    return sub


def _num_classes(ds) -> int:
    if hasattr(ds, "num_classes"):
        return int(ds.num_classes)
    if hasattr(ds, "classes"):
        return len(ds.classes)
    return int(np.max(ds.labels)) + 1


def _feature_cache_key(checkpoint: str, arch: str, data: str, size: int, train_samples: int = 0,
                       val_samples: int = 0, seed: int = 0) -> dict:
    st = Path(checkpoint).stat()
    key = {"checkpoint": str(Path(checkpoint).resolve()), "size_bytes": st.st_size, "mtime": st.st_mtime,
           "arch": arch, "data": str(data), "crop": size}
    if train_samples or val_samples:  # (keys of full-set caches written before these flags stay valid)
        key.update(train_samples=train_samples, val_samples=val_samples, subset_seed=seed)
    return key


# ============ main ============
def main(argv: list[str] | None = None) -> dict:
    from ..cli import ArgumentParser, make_dir

    args = ArgumentParser("fastcl linear probe", parents=[get_args_parser()]).parse_args(argv)
    for flag in ("train_samples", "val_samples", "epochs", "batch_size"):
        if getattr(args, flag) < (1 if flag in ("epochs", "batch_size") else 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {1 if flag in ('epochs', 'batch_size') else 0}, "
                             f"got {getattr(args, flag)}")
    data_name = "cifar10" if args.data == "cifar10" else Path(args.data).name
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / f"linear_{data_name}.json"
    make_dir(out.parent, f"--output {out}")  # before any work (was: "[Errno 17] File exists" after the probe)
    print(json.dumps(vars(args), indent=1), flush=True)
    torch.manual_seed(args.seed)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cpu" or args.device.startswith("cuda"):
        device = torch.device(args.device)
    else:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
           "fp16": torch.float16, "none": None}[args.amp]

    # ============ backbone ============
    backbone, arch, dim = load_backbone(args.checkpoint, args.arch, args.n_last_blocks, args.avgpool_patchtokens)
    backbone.to(device)
    lrs = args.lr or default_lrs(arch, args.data)
    size = args.size or (32 if args.data == "cifar10" else 224)
    print(f"backbone {arch} ({dim}-d features) from {args.checkpoint}; lrs {lrs}", flush=True)

    # ============ features / data ============
    train_tf, eval_tf = build_transforms(args.data, size)
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    key = _feature_cache_key(args.checkpoint, arch, args.data, size, args.train_samples, args.val_samples, args.seed)
    key["feature_dim"] = dim  # (ViT: depends on --n-last-blocks / --avgpool-patchtokens)
    args.cache_features |= args.feature_cache is not None
    cache = Path(args.feature_cache) if args.feature_cache else None
    if not args.cache_features:  # augmented batches drop the last partial one: one full batch at least, said before
        # any feature is extracted (was: "epochs and steps_per_epoch must be >= 1, got 1, 0" after the val features)
        train_ds = subset(build_dataset(args.data, "train", train_tf), args.train_samples, args.seed)
        if len(train_ds) < args.batch_size:
            raise ValueError(f"the training set has {len(train_ds)} images, fewer than one --batch-size "
                             f"{args.batch_size}: lower --batch-size, or pass --cache-features (which keeps the last "
                             "partial batch)")
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location="cpu")
        if stored.get("key") != key:
            raise ValueError(f"--feature-cache {cache} was written for {stored.get('key')}, not {key}; "
                             "delete it or pass another path")
        (train_f, train_y), (val_f, val_y) = stored["train"], stored["val"]
        train_f, train_y, val_f, val_y = (t.to(device) for t in (train_f, train_y, val_f, val_y))
        print(f"features from {cache}", flush=True)
    else:
        t0 = time.perf_counter()
        val_ds = subset(build_dataset(args.data, "val", eval_tf), args.val_samples, args.seed)
        val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)
        val_f, val_y = extract_features(backbone, val_loader, device, amp, progress="linear: val features")
        if args.cache_features:
            train_ds = subset(build_dataset(args.data, "train", eval_tf), args.train_samples, args.seed)
            loader = torch.utils.data.DataLoader(train_ds, shuffle=False, **loader_kw)
            train_f, train_y = extract_features(backbone, loader, device, amp, progress="linear: train features")
            if cache is not None:
                from ..engine.checkpoint import save_atomic

                save_atomic({"key": key, "train": (train_f.cpu(), train_y.cpu()), "val": (val_f.cpu(), val_y.cpu())},
                            cache)
        print(f"features extracted in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.cache_features:
        batches = cached_batches(train_f, train_y, args.batch_size, args.seed)
        steps, num_classes = -(-len(train_f) // args.batch_size), int(max(train_y.max(), val_y.max())) + 1
    else:
        g = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(train_ds, shuffle=True, drop_last=True, generator=g,
                                             persistent_workers=args.workers > 0, **loader_kw)
        batches, steps = image_batches(backbone, loader, device, amp), len(loader)
        num_classes = _num_classes(train_ds)

    # ============ linear training ============
    result = train_linear(batches, steps, val_f, val_y, dim, num_classes, lrs, args.epochs, args.batch_size,
                          args.momentum, args.wd, seed=args.seed)
    result.update(arch=arch, checkpoint=str(args.checkpoint), data=str(args.data), epochs=args.epochs,
                  batch_size=args.batch_size, cached_features=args.cache_features, args=vars(args))
    out.write_text(json.dumps(result, indent=1))
    print(f"linear probe {arch}: top-1 {result['best_top1']:.4f} top-5 {result['best_top5']:.4f} "
          f"(lr {result['best_lr']:g}); result in {out}", flush=True)
    return result


if __name__ == "__main__":  # (one error line for bad input, a diverged probe, an unwritable --output; Ctrl-C)
    from ..cli import main_guard

    main_guard(main)
