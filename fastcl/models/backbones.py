"""Backbones: images (B, 3, H, W) -> features (B, D), with the classifier removed.

ResNets and RegNetYs come from torchvision (``fc`` replaced by Identity, so exported weights load into
``torchvision.models.resnet50()`` / ``regnet_y_16gf()``), ViTs from timm (``num_classes=0``, never pretrained).
``resnet18_cifar`` is the CIFAR variant of the SimCLR/MoCo CIFAR demos: 3x3 stride-1 stem, no max-pool; a
``regnet_y_*_cifar`` keeps the 3x3 stem at stride 1. ``regnet_y_256gf`` is SEER's RegNetY-256GF (VISSL
``regnet256Gf_1.yaml``: depth 27, w_0 640, w_a 230.83, w_m 2.53, group width 373), built with torchvision's own
``RegNet`` class (torchvision ships RegNetY up to 128GF), so it loads into
``torchvision.models.RegNet(BlockParams.from_init_params(**SEER_REGNET_Y_256GF))``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
_VITS = {"vit_small_patch16_224": 384, "vit_small_patch8_224": 384, "vit_base_patch16_224": 768,
         "vit_large_patch16_224": 1024, "vit_huge_patch14_224": 1280, "vit_tiny_patch16_224": 192}
_REGNETS = ("regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf",
            "regnet_y_32gf", "regnet_y_128gf", "regnet_y_256gf")
SEER_REGNET_Y_256GF = dict(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373, se_ratio=0.25)
BACKBONES = sorted([*_RESNETS, *(f"{n}_cifar" for n in _RESNETS), *_REGNETS, *(f"{n}_cifar" for n in _REGNETS),
                    *_VITS])


def is_torchvision_cnn(name: str) -> bool:
    base = name.removesuffix("_cifar")
    return base in _RESNETS or base in _REGNETS


def _regnet_block_params(base: str):
    """torchvision's BlockParams of a RegNetY (computed with host tensors, so a model can then be built on the
    meta device), taken from torchvision's own builder; SEER's 256GF from VISSL's parameters."""
    from unittest import mock

    from torchvision.models import regnet

    with torch.device("cpu"):
        if base == "regnet_y_256gf":
            return regnet.BlockParams.from_init_params(**SEER_REGNET_Y_256GF)
        with mock.patch.object(regnet, "_regnet", lambda params, weights, progress, **kw: params):
            return getattr(regnet, base)(weights=None)


def torchvision_cnn(name: str, **kw) -> nn.Module:
    """The torchvision ResNet / RegNetY ``name`` (classifier ``fc`` still in place), with the CIFAR stem for
    ``*_cifar``: what ``build_backbone`` trains and what an export loads into."""
    base = name.removesuffix("_cifar")
    if base in _REGNETS:
        net = torchvision.models.RegNet(_regnet_block_params(base), **kw)
    else:
        net = getattr(torchvision.models, base)(weights=None, **kw)
    if name.endswith("_cifar"):  # small images: keep resolution in the stem
        if base in _RESNETS:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.stem[0] = nn.Conv2d(3, net.stem[0].out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    return net


def build_backbone(name: str, *, img_size: int | None = None, drop_path_rate: float = 0.0,
                   zero_init_residual: bool = False, **kw) -> tuple[nn.Module, int]:
    """Build a backbone by name; returns ``(module, feature_dim)``.

    ``img_size`` sets a ViT's position-embedding grid (other crop sizes are interpolated at run time).
    >>> net, dim = build_backbone("resnet18_cifar"); dim
    512
    """
    if is_torchvision_cnn(name):
        if name.removesuffix("_cifar") in _RESNETS:
            kw["zero_init_residual"] = zero_init_residual
        net = torchvision_cnn(name, **kw)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if name in _VITS:
        import timm

        vit_kw = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True, **kw)
        if img_size is not None:
            vit_kw["img_size"] = img_size
        net = timm.create_model(name, **vit_kw)
        return net, net.num_features  # (= _VITS[name] unless embed_dim is overridden)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def is_vit(name: str) -> bool:
    return name in _VITS
