"""torchvision back end of the augmentation spec (``fastcl.data.augment``).

One ``ViewSpec`` becomes one ``torchvision.transforms.v2`` pipeline:

    RandomResizedCrop(size, scale, ratio)          # on PIL (cheap: crop before decode-to-tensor) or tensor
    -> ToImage                                     # uint8 CHW tensor from here on
    -> RandomApply(ColorJitter(b, c, s, h), p=jitter_p)
    -> RandomGrayscale(grayscale_p)                # keeps 3 channels
    -> RandomApply(GaussianBlur(view.blur_kernel_size, blur_sigma), p=blur_p)
    -> RandomSolarize(solarize_threshold, p=solarize_p)   # threshold scaled to the dtype: x255 for uint8
    -> RandomHorizontalFlip(flip_p)
    -> ToDtype(float32, scale=True) -> Normalize(mean, std)

Ops whose probability is 0 (or whose strengths are all 0) are left out of the pipeline.
Inputs: PIL images, uint8 CHW tensors (the ``ArrayDataset`` path) or float CHW tensors in [0, 1].

>>> from fastcl.data import augment
>>> t = MultiViewTransform(augment.simclr(size=32, blur_p=0.0))
>>> views = t(torch.zeros(3, 32, 32, dtype=torch.uint8))
>>> [tuple(v.shape) for v in views]
[(3, 32, 32), (3, 32, 32)]
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .augment import AugmentSpec, ViewSpec


class RandomSolarize(torch.nn.Module):
    """Invert pixels >= ``threshold`` with probability ``p``.

    ``threshold`` is on the [0, 1] scale (as in ``ViewSpec``); it is multiplied by 255 for uint8
    images, so 0.5 inverts uint8 pixels >= 128 (the same pixels PIL's ``solarize(img, 128)`` inverts).
    """

    def __init__(self, threshold: float, p: float = 0.5):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"solarize threshold must be on the [0, 1] scale, got {threshold}")
        self.threshold, self.p = threshold, p

    def forward(self, img):
        if self.p < 1.0 and torch.rand(()) >= self.p:
            return img
        scale = 255.0 if img.dtype == torch.uint8 else 1.0
        return F.solarize(img, self.threshold * scale)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, p={self.p}"


def build_view_transform(view: ViewSpec) -> v2.Compose:
    """The torchvision pipeline for one view; returns a float32 CHW tensor of ``view.size``²."""
    ops: list = [
        v2.RandomResizedCrop(view.size, scale=tuple(view.scale), ratio=tuple(view.ratio), antialias=True),
        v2.ToImage(),
    ]
    strengths = (view.brightness, view.contrast, view.saturation, view.hue)
    if view.jitter_p > 0 and any(s > 0 for s in strengths):
        ops.append(v2.RandomApply([v2.ColorJitter(*strengths)], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=view.grayscale_p))
    if view.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(view.blur_kernel_size, sigma=tuple(view.blur_sigma))],
                                  p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(RandomSolarize(view.solarize_threshold, p=view.solarize_p))
    if view.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=view.flip_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(view.mean), list(view.std))]
    return v2.Compose(ops)


class MultiViewTransform:
    """Apply every view of an ``AugmentSpec`` to one image: returns ``spec.num_views`` tensors in
    ``spec.expanded()`` order (views with ``count > 1`` reuse one pipeline with fresh randomness)."""

    def __init__(self, spec: AugmentSpec):
        self.spec = spec
        built = [build_view_transform(v) for v in spec.views]
        self.transforms = [t for t, n in zip(built, spec.counts) for _ in range(n)]

    def __call__(self, img) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"MultiViewTransform(num_views={len(self)}, spec={self.spec})"


def eval_transform(size: int, mean, std, resize: int | None = None) -> v2.Compose:
    """Deterministic eval pipeline: [Resize(shorter side -> ``resize``)] -> CenterCrop(size) -> float -> Normalize.

    ImageNet: ``eval_transform(224, IMAGENET_MEAN, IMAGENET_STD, resize=256)``; CIFAR: ``eval_transform(32, ...)``
    (no resize; the centre crop of a 32x32 image to 32 is the identity).
    """
    ops: list = []
    if resize is not None:
        ops.append(v2.Resize(resize, antialias=True))
    ops += [v2.CenterCrop(size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)
