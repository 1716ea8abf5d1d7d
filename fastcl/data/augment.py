"""Augmentation as data: one ``ViewSpec`` per view, consumed with identical semantics by the
torchvision back end (``fastcl.data.transforms``) and the DALI back end (``fastcl.data.dali``).

Probabilities are per sample and per view. Colour-jitter strengths follow torchvision's
``ColorJitter``: brightness/contrast/saturation factor ~ U[1-s, 1+s], hue shift ~ U[-h, h] (in turns).
The four jitter ops are applied together with probability ``jitter_p`` (in torchvision's random order).
Solarize inverts pixels >= ``solarize_threshold`` (on the [0, 1] scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ViewSpec:
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (log-uniform)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel of ~10% of the view (SimCLR appendix A), at least 3."""
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewSpec.{name} must be a probability in [0, 1], got {p}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"ViewSpec.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if self.size <= 0:
            raise ValueError(f"ViewSpec.size must be positive, got {self.size}")


@dataclass(frozen=True)
class AugmentSpec:
    """The views one training sample expands into: ``views[i]`` is produced ``counts[i]`` times."""
    views: tuple[ViewSpec, ...]
    counts: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not self.counts:
            object.__setattr__(self, "counts", (1,) * len(self.views))
        if len(self.counts) != len(self.views):
            raise ValueError("AugmentSpec.counts must have one entry per view spec")

    def expanded(self) -> list[ViewSpec]:
        """One ViewSpec per output view, in output order."""
        return [v for v, n in zip(self.views, self.counts) for _ in range(n)]

    @property
    def num_views(self) -> int:
        return sum(self.counts)


def _for_data(view: ViewSpec, size: int | None, mean, std) -> ViewSpec:
    kw = {}
    if size is not None:
        kw["size"] = size
    if mean is not None:
        kw.update(mean=tuple(mean), std=tuple(std))
    return replace(view, **kw)


def mocov1(size=224, mean=None, std=None) -> AugmentSpec:
    """MoCo v1 / InstDisc: crop scale 0.2-1, jitter 0.4 (always), grayscale 0.2, flip."""
    v = ViewSpec(scale=(0.2, 1.0), jitter_p=1.0, hue=0.4, blur_p=0.0)
    return AugmentSpec((_for_data(v, size, mean, std),), (2,))


def mocov2_aug_plus(size=224, mean=None, std=None, blur_p=0.5) -> AugmentSpec:
    """MoCo v2 aug+: RRC(scale 0.2-1), jitter(0.4,0.4,0.4,0.1) p=0.8, gray 0.2, blur s~[0.1,2] p=0.5, flip.
    (CIFAR recipes pass ``blur_p=0``: blur is not used on 32x32 images.)"""
    return AugmentSpec((_for_data(ViewSpec(blur_p=blur_p), size, mean, std),), (2,))


def simclr(size=224, mean=None, std=None, strength=1.0, blur_p=0.5, scale=(0.08, 1.0)) -> AugmentSpec:
    """SimCLR: RRC(0.08-1), jitter(0.8s,0.8s,0.8s,0.2s) p=0.8, gray 0.2, blur p=0.5 (off on CIFAR), flip."""
    v = ViewSpec(scale=tuple(scale), brightness=0.8 * strength, contrast=0.8 * strength,
                 saturation=0.8 * strength, hue=0.2 * strength, blur_p=blur_p)
    return AugmentSpec((_for_data(v, size, mean, std),), (2,))


def byol(size=224, mean=None, std=None) -> AugmentSpec:
    """BYOL asymmetric views: jitter(0.4,0.4,0.2,0.1) p=0.8, gray 0.2; blur 1.0/0.1, solarize 0/0.2."""
    base = ViewSpec(scale=(0.08, 1.0), saturation=0.2)
    v1 = replace(base, blur_p=1.0, solarize_p=0.0)
    v2 = replace(base, blur_p=0.1, solarize_p=0.2)
    return AugmentSpec((_for_data(v1, size, mean, std), _for_data(v2, size, mean, std)))


def multicrop(global_size=224, local_size=96, n_local=10, global_scale=(0.32, 1.0),
              local_scale=(0.05, 0.32), mean=None, std=None, asymmetric=True) -> AugmentSpec:
    """DINO (asymmetric=True) / SwAV (False) multi-crop: 2 global views + ``n_local`` local views."""
    base = ViewSpec(saturation=0.2)
    if asymmetric:  # DINO: global 1 always blurred, global 2 rarely blurred + solarized, locals blur 0.5
        g1 = replace(base, scale=global_scale, blur_p=1.0)
        g2 = replace(base, scale=global_scale, blur_p=0.1, solarize_p=0.2)
        views, counts = [g1, g2], [1, 1]
    else:  # SwAV: every crop jitter 0.8 strength, blur 0.5
        g = replace(base, scale=global_scale, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
        views, counts = [g], [2]
    local = replace(views[-1] if not asymmetric else base, scale=local_scale, blur_p=0.5, solarize_p=0.0)
    views = [_for_data(v, global_size, mean, std) for v in views]
    if n_local > 0:
        views.append(_for_data(local, local_size, mean, std))
        counts.append(n_local)
    return AugmentSpec(tuple(views), tuple(counts))
