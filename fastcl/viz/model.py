"""The trained backbone of a checkpoint as its public torchvision / timm module, with what a picture needs to
feed it: the input size it was trained at and the normalization of its training data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn


@dataclass
class Backbone:
    net: nn.Module      # eval mode, CPU, images (B, 3, size, size) -> features (B, D)
    arch: str
    size: int           # input side in pixels: a ViT's trained img_size; 32 for *_cifar ResNets, else 224
    mean: tuple         # normalization of the training data (CIFAR-10's or ImageNet's)
    std: tuple
    cifar: bool         # trained on CIFAR-10 (or 32 px inputs)

    @property
    def is_vit(self) -> bool:
        return is_vit(self.net)


def is_vit(net: nn.Module) -> bool:
    """A timm ViT: transformer blocks whose attention computes q, k, v with one ``qkv`` projection."""
    blocks = getattr(net, "blocks", None)
    return (blocks is not None and len(blocks) > 0 and hasattr(blocks[-1], "attn")
            and hasattr(blocks[-1].attn, "qkv") and hasattr(net, "patch_embed"))


def load(path: str | Path) -> Backbone:
    """What ``fastcl.models.load_backbone`` returns, plus the input size and normalization.

    The training data is read from the checkpoint's recorded args (``--data``); an exported backbone records
    none, then a model taking 32 px inputs is taken as CIFAR-trained and anything else as ImageNet-trained.
    Raises FileNotFoundError / ValueError naming ``path`` (missing, unreadable, no backbone, CMC / CPC v2)."""
    from ..data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
    from ..eval.export import (backbone_state_dict, check_public_backbone, load_into_reference, model_kwargs_of,
                               read_checkpoint)

    from .common import need_file

    need_file(path, "checkpoint")
    ckpt = read_checkpoint(path)  # (load_backbone's steps, reading the file once to keep its args)
    check_public_backbone(ckpt, str(path))
    sd, arch = backbone_state_dict(ckpt, str(path))
    if not arch:
        raise ValueError(f"{path}: no architecture recorded in the checkpoint")
    net = load_into_reference(sd, arch, **model_kwargs_of(ckpt)).eval().requires_grad_(False)
    if is_vit(net):
        size = int(net.patch_embed.img_size[0])
    else:
        size = 32 if arch.endswith("_cifar") else 224
    args = ckpt.get("args")
    data = args.get("data") if isinstance(args, dict) else getattr(args, "data", None)
    cifar = data == "cifar10" if data is not None else size <= 32
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    return Backbone(net, arch, size, tuple(mean), tuple(std), cifar)
