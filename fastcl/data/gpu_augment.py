"""Batched back end of the augmentation spec (``fastcl.data.augment``): whole batches of uint8 NHWC images in, the
spec's views out, on whatever device the images live on (CUDA or CPU, same code). It serves the device-resident
loader (``fastcl.data.gpu``: CIFAR-10 held on the GPU as uint8), where no per-sample Python work is affordable.

Per ``ViewSpec``, the torchvision twin's pipeline (``fastcl.data.transforms.build_view_transform``) op by op, every
op vectorized over the batch with per-sample random parameters (probabilities are per sample and per view):

    random resized crop     boxes by ``sample_crop_boxes`` (torchvision's ``RandomResizedCrop`` draw: 10 attempts
                            of area ~ U(scale) * H * W, log-ratio ~ U(log ratio), first valid one, else its
                            centre-crop fallback), all samples at once; resampled by ``resized_crop``: bilinear,
                            align_corners=False, as ``interpolate`` on the cropped image: per-sample row and column
                            taps (source coordinates clamped to the box), rows gathered from the uint8 source and
                            blended, then columns
    horizontal flip (p)     folded into the crop (the column indices reversed): the flip commutes with every
                            later op (pointwise, or the mirror-symmetric blur), so where it sits does not matter
    to float                x / 255 (``ToDtype(float32, scale=True)``)
    colour jitter (p)       ``color_jitter``: brightness, contrast, saturation (torchvision's blends, each clamped
                            to [0, 1]) and the HSV hue shift in a per-sample random order (ColorJitter's
                            ``randperm(4)``); factors ~ U[max(0, 1-s), 1+s], hue ~ U[-h, h] turns
    grayscale (p)           0.2989 R + 0.587 G + 0.114 B (torchvision's weights), 3 channels kept
    gaussian blur (p)       reflect padding, separable kernel exp(-t^2 / (2 sigma^2)) / sum, sigma ~ U(blur_sigma),
                            ``view.blur_kernel_size`` taps: one grouped conv per axis, one group per sample-channel
    solarize (p)            x >= threshold -> 1 - x
    normalize               (x - mean) / std, then ``out_dtype`` and the memory format

A sample that draws "no" for an op gets the op's exact identity (an identity factor, or ``torch.where`` keeping
its pixels), so every sample of a batch runs the same kernels and nothing is read back to the host: no
synchronisation, and a seeded ``torch.Generator`` on the images' device reproduces the batch exactly. A view with
``count > 1`` is computed as one batch of ``count * B`` samples (fresh randomness per copy), so DINO's 10 local
crops cost about one batched pass.

Known, documented differences from the torchvision twin (which runs on uint8 CHW tensors, one image at a time):

* precision: torchvision's uint8 path rounds (resize, blur) or truncates (the colour ops' ``.to(uint8)``, and
  the grey level that contrast and saturation blend towards is floored) to uint8 after each op; this module
  stays in float32 until the end. Per op that is at most ~1 grey level (2 for saturation); a whole colour
  jitter (four ops, SimCLR strengths) comes out ~1.3 grey levels brighter on average than torchvision's uint8
  views (at most ~7 where the truncations add up). Against torchvision's ops on float images the maps agree to
  float32 rounding (max |diff| <= 1.3e-6 on [0, 1] in ``tests/data/test_gpu_augment.py``'s images; the hue
  shift and brightness bit for bit).
* resampling: bilinear without antialias. That is identical to torchvision's antialiased resize when upsampling
  or at scale 1 (antialias only acts when shrinking), which is all CIFAR's 32 px global crops do (a crop of a
  32 px image is at most 32 px); it differs slightly when a crop shrinks (e.g. DINO's local crops, or crops of
  images larger than the view): sharper, slightly aliased, as torchvision with ``antialias=False``.
* randomness: the same distributions, drawn from a different stream: a seed of this module does not give the
  views a seed of torchvision gives.

>>> from fastcl.data import augment
>>> aug = BatchAugment(augment.mocov2_aug_plus(32, augment.CIFAR10_MEAN, augment.CIFAR10_STD, blur_p=0.0))
>>> q, k = aug(torch.zeros(8, 32, 32, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
>>> tuple(q.shape), q.dtype
((8, 3, 32, 32), torch.float32)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import AugmentSpec, ViewSpec

__all__ = ["BatchAugment", "sample_crop_boxes", "resized_crop", "adjust_brightness", "adjust_contrast",
           "adjust_saturation", "adjust_hue", "color_jitter", "rgb_to_grayscale", "gaussian_blur", "solarize"]

_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (red 0.2989: the weights sum to 0.9999)
_CROP_ATTEMPTS = 10  # RandomResizedCrop.make_params / get_params


# ============ random resized crop ============

def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator | None = None, *, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` crop boxes (top, left, h, w), int64 (n,) each, distributed as torchvision's
    ``RandomResizedCrop.get_params`` on a ``height`` x ``width`` image.

    torchvision loops: up to 10 attempts of area = U(scale) * H * W, r = exp(U(log ratio)),
    w = round(sqrt(area r)), h = round(sqrt(area / r)), the first with 0 < w <= W and 0 < h <= H wins and gets
    top ~ randint(0, H - h + 1), left ~ randint(0, W - w + 1); with none valid, the centre crop of the image
    clipped to the ratio range. Here all 10 attempts of all samples are drawn at once and the first valid one is
    picked by ``argmax`` (first maximum) of the validity mask. Box arithmetic in float64, rounding half to even
    (Python's ``round``). ``device``: default the generator's (CPU without one).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 2 * _CROP_ATTEMPTS + 2, generator=generator, device=device, dtype=torch.float64)
    area = (height * width) * (scale[0] + (scale[1] - scale[0]) * u[:, :_CROP_ATTEMPTS])  # (n, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u[:, _CROP_ATTEMPTS:2 * _CROP_ATTEMPTS])
    w = torch.sqrt(area * r).round_()
    h = torch.sqrt(area / r).round_()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.int32).argmax(dim=1, keepdim=True)  # first valid attempt (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(u[:, -2] * (height - h + 1))  # randint(0, H - h + 1): U[0, 1) * count, floored
    left = torch.floor(u[:, -1] * (width - w + 1))
    # centre-crop fallback (a function of the image size and ratio only: host scalars)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = valid.any(dim=1)
    box = [torch.where(ok, v, float(fb)) for v, fb in
           ((top, (height - fh) // 2), (left, (width - fw) // 2), (h, fh), (w, fw))]
    return tuple(v.to(torch.int64) for v in box)  # type: ignore[return-value]


def _axis_taps(start: torch.Tensor, length: torch.Tensor, size: int, flip: torch.Tensor | None = None):
    """Bilinear taps along one axis, as ``interpolate(mode="bilinear", align_corners=False)`` computes them for a
    crop of ``length`` pixels at ``start`` resized to ``size``: source s = (o + 0.5) * length / size - 0.5,
    clamped to the crop [0, length - 1]; taps i0 = floor(s), i1 = min(i0 + 1, length - 1), weights 1 - l, l.
    Returns absolute indices i0, i1 (n, size) int64 and weights w0, w1 (n, size) float32. ``flip`` (n,) bool
    reverses the output order of the flipped samples (a horizontal flip of the resized crop)."""
    o = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    scale = (length.to(torch.float32) / size)[:, None]
    src = (o * scale - 0.5).clamp_(min=0.0)
    last = (length - 1).to(torch.float32)[:, None]
    i0 = torch.minimum(src.floor(), last)
    l1 = (src - i0).clamp_(0.0, 1.0)
    i1 = torch.minimum(i0 + 1.0, last)
    i0, i1 = i0.to(torch.int64) + start[:, None], i1.to(torch.int64) + start[:, None]
    l0 = 1.0 - l1
    if flip is not None:
        f = flip[:, None]
        i0, i1, l0, l1 = (torch.where(f, t.flip(1), t) for t in (i0, i1, l0, l1))
    return i0, i1, l0, l1


def _resample(planar: torch.Tensor, sample: torch.Tensor | None, top: torch.Tensor, left: torch.Tensor,
              h: torch.Tensor, w: torch.Tensor, size: int, flip: torch.Tensor | None) -> torch.Tensor:
    """The resized crops of ``planar`` (B, C, H, W), any dtype, for n boxes; ``sample`` (n,) picks each box's
    source image (None: box k of image k). Returns float32 (n, C, size, size).

    Separable: the two source rows of every output row are gathered whole (``index_select`` of contiguous rows)
    and blended, then the two columns of every output column (``gather``) are. A scale-1 crop is an exact copy
    (weights 1 and 0)."""
    b, c, height, width = planar.shape
    n = len(top)
    y0, y1, wy0, wy1 = _axis_taps(top, h, size)
    x0, x1, wx0, wx1 = _axis_taps(left, w, size, flip)
    rows = planar.reshape(b * c * height, width)
    src = torch.arange(n, device=top.device) if sample is None else sample
    base = ((src * c)[:, None] + torch.arange(c, device=top.device))[:, :, None] * height  # (n, C, 1)

    def pick_rows(y):  # (n, C, size, W) float32
        return rows.index_select(0, (base + y[:, None, :]).view(-1)).view(n, c, size, width).float()

    x = pick_rows(y0) * wy0[:, None, :, None] + pick_rows(y1) * wy1[:, None, :, None]
    shape = (n, c, size, size)
    return x.gather(3, x0[:, None, None, :].expand(shape)) * wx0[:, None, None, :] \
        + x.gather(3, x1[:, None, None, :].expand(shape)) * wx1[:, None, None, :]


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                 size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box k (top, left, h, w: int64 (B,)) of image k of ``x`` (B, C, H, W), resize it to ``size`` x ``size``
    bilinearly (align_corners=False, no antialias), then mirror the samples where ``flip`` (B,) bool is set.

    Equal to ``interpolate(x[k:k+1, :, t:t+h, l:l+w], (size, size), mode="bilinear", align_corners=False)`` per
    sample (torchvision's ``F.resized_crop(..., antialias=False)``), up to float32 rounding. Boxes must lie
    inside the image. Integer images give float32."""
    out = _resample(x, None, top, left, h, w, size, flip)
    return out.to(x.dtype) if x.is_floating_point() else out


# ============ colour ============

def _select(cond: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``torch.where(cond, a, b)``. On the CPU computed as a c + b (1 - c) with c = cond in {0., 1.}: the same
    values for finite a and b (one product is 0) and several times faster than the CPU's ``where`` kernel."""
    if cond.device.type != "cpu":
        return torch.where(cond, a, b)
    c = cond.to(torch.float32)
    return a * c + b * (1.0 - c)


def _frac(z: torch.Tensor) -> torch.Tensor:
    """z - floor(z) = remainder(z, 1) (bit for bit: for z in [-1, 2) the subtraction is exact or is the one
    rounding that ``remainder`` does too), one vectorized op instead of the CPU's slow ``remainder``."""
    return z - torch.floor(z)


def _b(f: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) -> broadcastable against (B, C, H, W)."""
    return f.to(torch.float32).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Grey level (B, 1, H, W) of float RGB (B, 3, H, W), as torchvision sums it (R first, left to right)."""
    r, g, b = x.unbind(dim=1)
    return (r * _GREY_WEIGHTS[0] + g * _GREY_WEIGHTS[1] + b * _GREY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, target: torch.Tensor | float, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` on float images: clamp(f x + (1 - f) target, 0, 1), per-sample f."""
    f = _b(f)
    return (x * f + target * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x, 0, 1): ``v2.functional.adjust_brightness`` on float images, per-sample factor f (B,)."""
    return (x * _b(f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level m: clamp(f x + (1 - f) m, 0, 1) (``adjust_contrast``)."""
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the pixel's grey level Y: clamp(f x + (1 - f) Y, 0, 1) (``adjust_saturation``)."""
    return _blend(x, _grey(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """HSV hue shift by f (B,) turns in [-0.5, 0.5], torchvision's ``adjust_hue`` on float images, step by step.

    RGB -> HSV (torchvision's ``_rgb_to_hsv``, after Pillow): V = max, C = V - min, S = C / V; with
    rc, gc, bc = (V - channel) / C, H = bc - gc if R is the max, 2 + rc - bc if G is (and R is not),
    4 + gc - rc otherwise, in sixths, wrapped to [0, 1) (greys: C = 0, H = S = 0). Shift H by f modulo 1.
    HSV -> RGB (``_hsv_to_rgb``): sextant i = floor(6 H) mod 6, fraction u = 6 H - floor(6 H), p = V (1 - S),
    q = V (1 - S u), t = V (1 - S (1 - u)); (R, G, B) = (V, t, p), (q, V, p), (p, V, t), (p, q, V), (t, p, V),
    (V, p, q) for i = 0..5. torchvision picks them with a gather over a stacked (V, p, q, t); here ``where``
    chains pick the same values on the three planes.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    crange = maxc - minc
    eqc = (crange == 0).to(torch.float32)  # grey: crange = 0, so both divisors may be replaced by anything > 0
    s = crange / (maxc + eqc)
    div = crange + eqc
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    max_r = (maxc == r).to(torch.float32)
    max_g = (maxc == g).to(torch.float32) * (1.0 - max_r)  # G is the max and R is not
    hue = (bc - gc) * max_r + (rc + 2.0 - bc) * max_g + (gc + 4.0 - rc) * (1.0 - max_r - max_g)
    hue = _frac(hue * (1.0 / 6.0) + 1.0)  # fmod(., 1) of a positive value
    hue = _frac(hue + f.to(torch.float32).view(-1, 1, 1))  # remainder(., 1)
    # back to RGB
    h6 = hue * 6.0
    sextant = torch.floor(h6).clamp_(max=5.0)  # hue rounded up to 1.0: sextant 5 with fraction 1 = sextant 0
    frac = h6 - sextant
    sf = s * frac
    one_minus_s = 1.0 - s
    q = ((1.0 - sf) * maxc).clamp_(0.0, 1.0)
    t = ((sf + one_minus_s) * maxc).clamp_(0.0, 1.0)
    p = (one_minus_s * maxc).clamp_(0.0, 1.0)
    i1, i2, i3, i4, i5 = (sextant < k for k in (1.0, 2.0, 3.0, 4.0, 5.0))
    r = _select(i1, maxc, _select(i2, q, _select(i4, p, _select(i5, t, maxc))))
    g = _select(i1, t, _select(i3, maxc, _select(i4, q, p)))
    b = _select(i2, p, _select(i3, t, _select(i5, maxc, q)))
    return torch.stack((r, g, b), dim=1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """0.2989 R + 0.587 G + 0.114 B in all 3 channels (``rgb_to_grayscale(num_output_channels=3)``)."""
    return _grey(x).expand_as(x)


def color_jitter(x: torch.Tensor, brightness_f: torch.Tensor | None, contrast_f: torch.Tensor | None,
                 saturation_f: torch.Tensor | None, hue_f: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample factors (B,) and per-sample op order ``order`` (B, 4), a
    permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue per row (ColorJitter's ``randperm(4)``).
    A factor of ``None`` turns the op off for all samples; brightness/contrast/saturation factor 1 and hue 0 are
    exact identities (so ``None`` = all identity).

    Brightness, contrast and saturation are one blend, clamp(f x + (1 - f) T, 0, 1), with target T = 0, the
    image's mean grey level m or the pixel's grey level Y: each step blends every sample towards the target of
    the op its permutation puts there, as clamp(f x + (w_Y Y + w_m m), 0, 1) with per-sample weights
    w_Y = (1 - f) [op = saturation], w_m = (1 - f) [op = contrast] (exactly torchvision's f x + (1 - f) T:
    the other term is 0). The hue shift, the expensive op, runs once per batch: the blend steps are split into
    those before each sample's hue (positions 0-2, identity (f = 1) from the hue's position on) and those after
    it (positions hue + 1 .. hue + 3, identity past 3). Without hue: 4 steps, one per position. No Python loop
    over samples; torchvision's clamps after every op are all kept.
    """
    use_mean, use_grey = contrast_f is not None, saturation_f is not None
    if not (use_mean or use_grey or brightness_f is not None):  # hue at most
        return x if hue_f is None else _select(_b(hue_f) != 0, adjust_hue(x, hue_f), x)
    order = order.to(torch.int64)
    ones = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    table = torch.stack([ones if f is None else f.to(torch.float32)  # (B, 4): factor of each op, 1 for the hue
                         for f in (brightness_f, contrast_f, saturation_f)] + [ones], dim=1)
    if hue_f is None:
        ops, active = order, None  # (B, 4): the op of each step
    else:
        hue_pos = (order == 3).to(torch.int32).argmax(dim=1, keepdim=True)  # (B, 1)
        steps = torch.arange(3, device=x.device)
        post = hue_pos + 1 + steps  # (B, 3) positions after the hue
        ops = torch.cat([order[:, :3], order.gather(1, post.clamp(max=3))], dim=1)  # (B, 6)
        active = torch.cat([steps < hue_pos, post <= 3], dim=1)
    f = table.gather(1, ops)
    if active is not None:
        f = torch.where(active, f, 1.0)  # (B, steps): tiny, so torch.where is fine on any device
    w_grey, w_mean = (1.0 - f) * (ops == 2), (1.0 - f) * (ops == 1)

    def blend_step(x: torch.Tensor, k: int) -> torch.Tensor:
        y = x * _b(f[:, k])
        if use_mean or use_grey:
            grey = _grey(x)
            t = grey * _b(w_grey[:, k]) if use_grey else 0.0
            if use_mean:
                t = t + grey.mean(dim=(1, 2, 3), keepdim=True) * _b(w_mean[:, k])
            y += t
        return y.clamp_(0.0, 1.0)

    for k in range(ops.shape[1] if hue_f is None else 3):  # positions up to the hue
        x = blend_step(x, k)
    if hue_f is None:
        return x
    x = _select(_b(hue_f) != 0, adjust_hue(x, hue_f), x)
    for k in range(3, 6):  # positions after the hue
        x = blend_step(x, k)
    return x


# ============ blur, solarize ============

def _gaussian_taps(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, k) normalized taps exp(-t^2 / (2 sigma^2)), t = -(k-1)/2 .. (k-1)/2, computed as torchvision does
    (softmax of -(t' / sigma)^2 with t' = t / sqrt(2))."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax((t / sigma.to(torch.float32)[:, None]).pow(2).neg(), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with per-sample sigma (B,), ``kernel_size`` taps (odd), reflect padding:
    torchvision's ``gaussian_blur`` (which convolves with the outer product of the same 1-D taps) as two 1-D
    grouped convolutions, one group per (sample, channel)."""
    if kernel_size % 2 == 0 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    b, c, height, width = x.shape
    taps = _gaussian_taps(sigma, kernel_size).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, taps[:, None, :, None], groups=b * c)  # vertical: (1, B*C, H, W + 2 pad)
    y = F.conv2d(y, taps[:, None, None, :], groups=b * c)  # horizontal: (1, B*C, H, W)
    return y.view(b, c, height, width)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert (1 - x) the pixels >= ``threshold`` of a float image in [0, 1]."""
    return _select(x >= threshold, 1.0 - x, x)


# ============ the batched pipeline ============

# columns of the per-sample uniforms one view draws (besides the crop's)
_FLIP, _JITTER, _B, _C, _S, _H, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLAR = 0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13
_NUM_U = 14


def _factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """ColorJitter factor ~ U[max(0, 1 - s), 1 + s] from u ~ U[0, 1)."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * u


class BatchAugment:
    """All views of ``spec`` for a batch of uint8 (B, H, W, 3) images, on the images' device.

    Args:
        spec: the views (``fastcl.data.augment``).
        out_dtype: dtype of the returned views (float32, or bfloat16/float16 for training).
        channels_last: return views in ``torch.channels_last`` memory format.

    >>> from fastcl.data import augment
    >>> aug = BatchAugment(augment.simclr(32, blur_p=0.0), out_dtype=torch.bfloat16, channels_last=True)
    >>> views = aug(images_on_gpu, torch.Generator("cuda").manual_seed(0))  # doctest: +SKIP
    """

    def __init__(self, spec: AugmentSpec, *, out_dtype: torch.dtype = torch.float32, channels_last: bool = False):
        if not out_dtype.is_floating_point:
            raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
        for v in spec.views:
            if v.hue > 0.5:
                raise ValueError(f"ViewSpec.hue must be <= 0.5 turns (torchvision's ColorJitter), got {v.hue}")
            if v.blur_p > 0 and not 0 < v.blur_sigma[0] <= v.blur_sigma[1]:
                raise ValueError(f"ViewSpec.blur_sigma must satisfy 0 < lo <= hi, got {v.blur_sigma}")
        self.spec, self.out_dtype, self.channels_last = spec, out_dtype, channels_last
        self._consts: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _mean_std(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if device not in self._consts:  # once per device: no host->device copy per batch
            self._consts[device] = [(torch.tensor(v.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                                     torch.tensor(v.std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
                                    for v in self.spec.views]
        return self._consts[device]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """images: uint8 (B, H, W, 3) on any device. Returns ``spec.num_views`` tensors (B, 3, S, S) in
        ``spec.expanded()`` order (S = that view's size), normalized with the view's mean/std, in ``out_dtype``,
        channels_last if asked. All randomness from ``generator`` (on the images' device; None = the default
        generator), so a fixed seed reproduces the batch exactly."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        planar = images.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8, shared by all views
        batch = images.shape[0]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out: list[torch.Tensor] = []
        for view, count, (mean, std) in zip(self.spec.views, self.spec.counts, self._mean_std(images.device)):
            sample = torch.arange(batch, device=images.device).repeat(count)  # copy-major: view copy j = rows jB..
            x = self._view(planar, sample, view, generator)
            x = ((x - mean) / std).to(dtype=self.out_dtype, memory_format=fmt)
            out += list(x.split(batch)) if count > 1 else [x]
        return out

    def _view(self, planar: torch.Tensor, sample: torch.Tensor, v: ViewSpec,
              generator: torch.Generator | None) -> torch.Tensor:
        """One view for each entry of ``sample`` (indices into ``planar``, uint8 (B, 3, H, W)): float32
        (n, 3, S, S) in [0, 1]."""
        n, (height, width) = len(sample), planar.shape[2:]
        dev = planar.device
        top, left, h, w = sample_crop_boxes(n, height, width, v.scale, v.ratio, generator, device=dev)
        u = torch.rand(n, _NUM_U, generator=generator, device=dev)
        flip = u[:, _FLIP] < v.flip_p if v.flip_p > 0 else None
        x = _resample(planar, sample, top, left, h, w, v.size, flip).mul_(1.0 / 255)  # ToDtype(scale=True)

        strengths = (v.brightness, v.contrast, v.saturation)
        if v.jitter_p > 0 and (any(s > 0 for s in strengths) or v.hue > 0):
            on = u[:, _JITTER] < v.jitter_p
            b, c, s = (torch.where(on, _factor(u[:, col], st), 1.0) if st > 0 else None
                       for col, st in zip((_B, _C, _S), strengths))
            hue = torch.where(on, v.hue * (2.0 * u[:, _H] - 1.0), 0.0) if v.hue > 0 else None
            order = u[:, _ORDER:_ORDER + 4].argsort(dim=1)  # a uniform random permutation per sample
            x = color_jitter(x, b, c, s, hue, order)
        if v.grayscale_p > 0:
            x = _select(_b(u[:, _GRAY]) < v.grayscale_p, rgb_to_grayscale(x), x)
        if v.blur_p > 0:
            sigma = v.blur_sigma[0] + (v.blur_sigma[1] - v.blur_sigma[0]) * u[:, _SIGMA]
            blurred = gaussian_blur(x, sigma, v.blur_kernel_size)
            x = blurred if v.blur_p >= 1 else _select(_b(u[:, _BLUR]) < v.blur_p, blurred, x)
        if v.solarize_p > 0:
            x = _select((_b(u[:, _SOLAR]) < v.solarize_p) & (x >= v.solarize_threshold), 1.0 - x, x)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment(out_dtype={self.out_dtype}, channels_last={self.channels_last}, spec={self.spec})"
