"""Batched augmentation (``fastcl.data.gpu_augment``) against torchvision, op by op and end to end.

1. Maps: each batched op with per-sample parameters equals ``torchvision.transforms.v2.functional``'s op applied
   sample by sample on float images (hue wheel, random pixels, greys, ties, primaries; factors that clip).
2. Distributions: crop boxes against ``RandomResizedCrop.get_params`` (two-sample KS), jitter factors, blur sigma
   and every probability, read back from ``BatchAugment``'s output on probe images built so that one op is
   observable.
3. ``BatchAugment`` end to end: shapes, dtypes, memory format, normalization, seeded determinism, equality with
   ``build_view_transform`` where both are deterministic, and the pipeline's pixel statistics against it.
"""
from __future__ import annotations

import colorsys
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torchvision import transforms as T1
from torchvision.transforms.v2 import functional as F

from fastcl.data import augment
from fastcl.data import gpu_augment as ga
from fastcl.data.augment import AugmentSpec, ViewSpec
from fastcl.data.transforms import build_view_transform

ATOL = 1e-5  # float32 vs float32: a different association of the same products (a few ulp of values <= 1)
MEAN, STD = augment.CIFAR10_MEAN, augment.CIFAR10_STD
# A view with every random op off and an identity crop; tests switch on one op at a time.
# mean 0 / std 1 makes the output the [0, 1] pixel values.
PLAIN = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                 solarize_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _images(n: int, h: int = 9, w: int = 12, seed: int = 0) -> torch.Tensor:
    """n float (3, h, w) images in [0, 1]: a hue wheel (every sextant, several saturations and values, on the
    k/255 grid), edge cases (greys incl. 0 and 1, ties for the max and the min channel, primaries, near-greys),
    then random pixels, half on the k/255 grid (ties between channels), half continuous."""
    g = torch.Generator().manual_seed(seed)
    hues = [colorsys.hsv_to_rgb(k / w, s, v) for s, v in itertools.product((1.0, 0.7, 0.3, 0.05), (1.0, 0.8, 0.4))
            for k in range(w)]
    wheel = torch.tensor(hues[: h * w] + [(0.5, 0.5, 0.5)] * max(0, h * w - len(hues)))
    wheel = (wheel * 255).round() / 255
    edge = torch.tensor([[x, x, x] for x in (0, 1, 128, 255)]
                        + [[200, 200, 50], [200, 50, 200], [50, 200, 200], [50, 50, 200], [50, 200, 50],
                           [200, 50, 50], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                           [255, 0, 255], [200, 199, 198], [3, 2, 1], [254, 255, 255], [0, 0, 1]]) / 255.0
    out = []
    for k in range(n):
        if k % 2:
            img = torch.randint(0, 256, (h * w, 3), generator=g).float() / 255
        else:
            img = torch.rand(h * w, 3, generator=g)
        if k == 0:
            img = wheel
        elif k == 1:
            img[: len(edge)] = edge
        out.append(img.T.reshape(3, h, w))
    return torch.stack(out)


def _maxdiff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


# ============ 1. maps against torchvision's functional ops ============

@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(name):
    x = _images(16)
    f = torch.linspace(0.0, 2.0, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(1))]  # 0, 1, 2 in
    got = getattr(ga, f"adjust_{name}")(x, f)
    ref = torch.stack([getattr(F, f"adjust_{name}")(x[k], float(f[k])) for k in range(len(x))])
    assert _maxdiff(got, ref) <= ATOL
    assert got.min() >= 0 and got.max() <= 1 and (ref == 1).any()  # factors up to 2 clip: the clamp is exercised


def test_hue_matches_torchvision():
    x = _images(21, seed=2)
    f = torch.linspace(-0.5, 0.5, 21)  # 0 and both limits included
    got = ga.adjust_hue(x, f)
    ref = torch.stack([F.adjust_hue(x[k], float(f[k])) for k in range(len(x))])
    assert _maxdiff(got, ref) <= ATOL
    # the shift keeps every pixel's max and min (HSV value and chroma), and actually moves the colours
    torch.testing.assert_close(got.amax(1), x.amax(1), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.amin(1), x.amin(1), atol=ATOL, rtol=0)
    assert _maxdiff(got[1:], x[1:]) > 0.3


def test_grayscale_and_solarize_match_torchvision():
    x = _images(6)
    x[2, :, 0, :4] = 0.5  # exactly on the threshold: inverted (>=)
    torch.testing.assert_close(ga.rgb_to_grayscale(x), F.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    for thr in (0.5, 0.2):
        assert torch.equal(ga.solarize(x, thr), F.solarize(x, thr))
    assert torch.equal(ga.solarize(x, 0.5)[2, :, 0, :4], torch.full((3, 4), 0.5))


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = _images(6, h=11, w=13, seed=3)  # weird shapes
    sigma = torch.tensor([0.1, 2.0, 0.5, 1.0, 1.7, 0.3])
    got = ga.gaussian_blur(x, sigma, kernel_size)
    ref = torch.stack([F.gaussian_blur(x[k], [kernel_size] * 2, [float(sigma[k])] * 2) for k in range(len(x))])
    assert _maxdiff(got, ref) <= ATOL
    assert _maxdiff(got[1], x[1]) > 0.1  # sigma 2 does blur


ORDERS = torch.tensor(list(itertools.permutations(range(4))) * 2)  # all 24 orders, twice

JITTER_CASES = {  # which of (brightness, contrast, saturation, hue) are on
    "all": (True,) * 4, "no_hue": (True, True, True, False), "hue_only": (False, False, False, True),
    "brightness_hue": (True, False, False, True), "contrast_saturation": (False, True, True, False),
}


@pytest.mark.parametrize("case", list(JITTER_CASES))
def test_color_jitter_matches_torchvision_in_every_order(case):
    """Factors in [0.2, 1.8] (the intermediate clamps matter), each of the 24 orders twice, against torchvision's
    four ops applied in that order (``ColorJitter.transform``)."""
    on = JITTER_CASES[case]
    n = len(ORDERS)
    x = _images(n, h=6, w=7, seed=4)
    g = torch.Generator().manual_seed(5)
    factors = [0.2 + 1.6 * torch.rand(n, generator=g) for _ in range(3)] + [torch.rand(n, generator=g) - 0.5]
    factors[0][3] = factors[1][4] = factors[2][5] = 1.0  # identities inside a jitter
    factors[3][6] = 0.0
    used = [f if flag else None for f, flag in zip(factors, on)]
    got = ga.color_jitter(x, *used, order=ORDERS)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    ref = []
    for k in range(n):
        y = x[k]
        for op in ORDERS[k].tolist():
            if on[op]:
                y = ops[op](y, float(factors[op][k]))
        ref.append(y)
    assert _maxdiff(got, torch.stack(ref)) <= ATOL
    if case == "all":  # the order matters here (so a wrong order would fail the comparison)
        shuffled = ga.color_jitter(x, *used, order=ORDERS.flip(1))
        assert _maxdiff(shuffled, torch.stack(ref)) > 0.05


def test_color_jitter_identity_factors_are_exact():
    x = _images(24, seed=6)
    ones = torch.ones(24)
    assert torch.equal(ga.color_jitter(x, ones, ones, ones, torch.zeros(24), ORDERS[:24]), x)
    assert torch.equal(ga.color_jitter(x, None, None, None, None, ORDERS[:24]), x)


def _crop_cases():
    # (top, left, h, w) on a 20 x 27 image: the whole image, corners, 1-pixel and 1-row/column boxes, random ones
    boxes = [(0, 0, 20, 27), (0, 0, 5, 7), (15, 20, 5, 7), (19, 26, 1, 1), (3, 0, 1, 27), (0, 13, 20, 1),
             (2, 3, 16, 16), (0, 0, 20, 20), (4, 7, 13, 20)]
    g = torch.Generator().manual_seed(7)
    for _ in range(7):
        h, w = int(torch.randint(1, 21, (1,), generator=g)), int(torch.randint(1, 28, (1,), generator=g))
        top, left = torch.randint(0, 21 - h, (1,), generator=g), torch.randint(0, 28 - w, (1,), generator=g)
        boxes.append((int(top), int(left), h, w))
    return torch.tensor(boxes).T


@pytest.mark.parametrize("size", [32, 20, 8, 1])
def test_resized_crop_matches_crop_then_interpolate(size):
    """Upsampling (32), scale ~1 (20), downsampling (8), and a single output pixel, with and without flip."""
    top, left, h, w = _crop_cases()
    n = len(top)
    x = _images(n, h=20, w=27, seed=8)
    flip = torch.arange(n) % 2 == 1
    got = ga.resized_crop(x, top, left, h, w, size, flip)
    ref, ref_tv = [], []
    for k in range(n):
        t, l, hh, ww = int(top[k]), int(left[k]), int(h[k]), int(w[k])
        y = TF.interpolate(x[k:k + 1, :, t:t + hh, l:l + ww], size=(size, size), mode="bilinear",
                           align_corners=False, antialias=False)[0]
        z = F.resized_crop(x[k], t, l, hh, ww, [size, size], antialias=False)
        ref.append(y.flip(-1) if flip[k] else y)
        ref_tv.append(z.flip(-1) if flip[k] else z)
    assert got.shape == (n, 3, size, size)
    assert _maxdiff(got, torch.stack(ref)) <= ATOL
    assert _maxdiff(got, torch.stack(ref_tv)) <= ATOL
    # a box of the whole image at its own size is an exact copy
    full = ga.resized_crop(x[:2, :, :size, :size], torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                           torch.full((2,), min(size, 20)), torch.full((2,), min(size, 20)), min(size, 20))
    assert torch.equal(full, x[:2, :, :min(size, 20), :min(size, 20)])


def test_resized_crop_upsampling_equals_torchvision_antialiased():
    """Antialias only acts when shrinking: every crop that is upsampled (CIFAR's global crops) matches torchvision's
    default ``antialias=True`` too."""
    top, left, h, w = _crop_cases()
    x = _images(len(top), h=20, w=27, seed=9)
    got = ga.resized_crop(x, top, left, h, w, 32)
    ref = torch.stack([F.resized_crop(x[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [32, 32],
                                      antialias=True) for k in range(len(top))])
    assert _maxdiff(got, ref) <= ATOL


# ============ 2. distributions ============

def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (valid for discrete samples: conservative)."""
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


N_BOX = 20_000
KS_CRIT = 0.022  # two samples of 20,000: P(KS > 0.022) ~ 1e-4 under the null (c(alpha) = 2.2)


def _torchvision_boxes(n, height, width, scale, ratio, seed):
    torch.manual_seed(seed)
    img = torch.empty(3, height, width)
    return np.array([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], np.float64)


def _box_stats(boxes: np.ndarray, height: int, width: int):
    top, left, h, w = boxes.T
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


def _fallback_box(height, width, ratio):
    """torchvision's centre crop after 10 invalid attempts: the whole image, clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return np.array([(height - h) // 2, (width - w) // 2, h, w])


@pytest.mark.parametrize("size,scale,ratio", [
    ((32, 32), (0.2, 1.0), (3 / 4, 4 / 3)), ((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)),
    ((32, 32), (0.05, 0.32), (3 / 4, 4 / 3)),
    ((32, 32), (0.6, 1.0), (1.5, 3.0)),  # mostly falls back (to a wide centre crop)
    ((24, 40), (0.35, 1.0), (0.5, 0.8)),  # weird shapes: non-square, often falls back (to a tall centre crop)
])
def test_crop_boxes_match_torchvision_distribution(size, scale, ratio):
    H, W = size
    got = torch.stack(ga.sample_crop_boxes(N_BOX, H, W, scale, ratio, torch.Generator().manual_seed(0)), 1).numpy()
    ref = _torchvision_boxes(N_BOX, H, W, scale, ratio, seed=1)
    top, left, h, w = got.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    sg, sr = _box_stats(got.astype(np.float64), H, W), _box_stats(ref, H, W)
    for key in sg:
        assert _ks(sg[key], sr[key]) < KS_CRIT, key
    # the fallback box's frequency (a valid draw may hit the same box now and then, in both)
    fb = _fallback_box(H, W, ratio)
    p_got, p_ref = (got == fb).all(1).mean(), (ref == fb).all(1).mean()
    sd = math.sqrt(max(p_ref * (1 - p_ref), 1 / N_BOX) * 2 / N_BOX)
    assert abs(p_got - p_ref) <= 4 * sd, (p_got, p_ref)
    if ratio != (3 / 4, 4 / 3):
        assert 0.2 < p_ref < 0.95  # the fallback is really exercised


def test_crop_box_ks_detects_a_wrong_scale():
    """The KS check above has the power to see a wrong distribution: scale (0.2, 1) vs torchvision's (0.08, 1)."""
    got = torch.stack(ga.sample_crop_boxes(N_BOX, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3),
                                           torch.Generator().manual_seed(0)), 1).numpy()
    ref = _torchvision_boxes(N_BOX, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), seed=1)
    assert _ks(_box_stats(got.astype(np.float64), 32, 32)["area"], _box_stats(ref, 32, 32)["area"]) > 3 * KS_CRIT


N_PROBE = 4000


def _probe(view: ViewSpec, pixel, n: int = N_PROBE, seed: int = 0, count: int = 1, image=None) -> torch.Tensor:
    """``BatchAugment`` of n copies of an 8x8 image (constant ``pixel`` unless ``image`` (8, 8, 3) is given), the
    ``count`` views stacked: (count, n, 3, 8, 8) float64 in [0, 255] (with PLAIN's mean 0 / std 1)."""
    img = torch.tensor(pixel, dtype=torch.uint8).expand(8, 8, 3) if image is None else image
    aug = ga.BatchAugment(AugmentSpec((view,), (count,)))
    views = aug(img.expand(n, 8, 8, 3).contiguous(), torch.Generator().manual_seed(seed))
    return torch.stack(views).double() * 255


def _assert_freq(mask: torch.Tensor, p: float):
    """Binomial frequency within 4 standard deviations."""
    n = mask.numel()
    assert abs(mask.double().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (mask.double().mean(), p)


def _assert_uniform(values: torch.Tensor, lo: float, hi: float):
    """In [lo, hi], and one-sample KS against U[lo, hi] below its alpha = 1e-3 critical value."""
    v = np.sort(values.numpy())
    assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    cdf = np.clip((v - lo) / (hi - lo), 0, 1)
    i = np.arange(1, len(v) + 1)
    ks = max((i / len(v) - cdf).max(), (cdf - (i - 1) / len(v)).max())
    assert ks < 1.95 / math.sqrt(len(v)), ks
    assert v.min() < lo + 0.02 * (hi - lo) and v.max() > hi - 0.02 * (hi - lo)  # the whole range is explored


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_jitter_factors_and_probability(op):
    """One jitter op at a time (jitter_p 0.7), read back from probe images: factors ~ U[1 - s, 1 + s] (hue
    U[-h, h]) and applied to 70% of the samples."""
    s = 0.1 if op == "hue" else 0.4
    strengths = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    view = replace(PLAIN, jitter_p=0.7, **dict(strengths, **{op: s}))
    if op == "brightness":  # grey 100: out = 100 b
        y = _probe(view, (100, 100, 100))[0]
        factor = y[:, 0, 0, 0] / 100
    elif op == "contrast":  # left half 60, right half 140: the spread scales by c
        img = torch.full((8, 8, 3), 60, dtype=torch.uint8)
        img[:, 4:] = 140
        y = _probe(view, None, image=img)[0]
        factor = (y[:, 0, 0, 7] - y[:, 0, 0, 0]) / 80
    elif op == "saturation":  # (150, 100, 50): R - B scales by s (the grey level cancels)
        y = _probe(view, (150, 100, 50))[0]
        factor = (y[:, 0, 0, 0] - y[:, 2, 0, 0]) / 100
    else:  # (200, 100, 100) has hue 0: the output's hue is the shift
        y = _probe(view, (200, 100, 100))[0]
        hsv = [colorsys.rgb_to_hsv(*(y[k, :, 0, 0] / 255).tolist()) for k in range(len(y))]
        factor = torch.tensor([(hh + 0.5) % 1.0 - 0.5 for hh, _, _ in hsv], dtype=torch.float64)
    identity = 0.0 if op == "hue" else 1.0
    moved = (factor - identity).abs() > 1e-6
    _assert_freq(moved, 0.7)
    _assert_uniform(factor[moved], identity - s, identity + s)


def test_jitter_order_is_a_uniform_permutation(monkeypatch):
    """The order ``BatchAugment`` hands to ``color_jitter`` (spied on): a permutation per sample, each of the 24
    with frequency 1/24; identity factors for the samples that skip the jitter."""
    seen = {}

    def spy(x, b, c, s, h, order):
        seen.update(b=b, c=c, s=s, h=h, order=order)
        return x

    monkeypatch.setattr(ga, "color_jitter", spy)
    n = 24_000
    view = replace(PLAIN, size=2, jitter_p=0.5)
    ga.BatchAugment(AugmentSpec((view,)))(torch.zeros(n, 2, 2, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
    order = seen["order"]
    assert order.shape == (n, 4) and torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
    code = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(code, minlength=256)[code.unique()]
    assert len(counts) == 24
    p = 1 / 24
    assert ((counts / n - p).abs() <= 4 * math.sqrt(p * (1 - p) / n)).all(), counts
    # relative order of any two ops: each way round half the time
    _assert_freq((order == 0).int().argmax(1) < (order == 3).int().argmax(1), 0.5)
    off = (seen["b"] == 1) & (seen["c"] == 1) & (seen["s"] == 1) & (seen["h"] == 0)
    _assert_freq(off, 0.5)


@pytest.mark.parametrize("op,p", [("grayscale", 0.3), ("solarize", 0.2), ("flip", 0.5), ("blur", 0.4)])
def test_probabilities(op, p):
    if op == "grayscale":
        y = _probe(replace(PLAIN, grayscale_p=p), (200, 100, 30))[0]
        hit = (y[:, 0] == y[:, 2]).flatten(1).all(1)
    elif op == "solarize":
        y = _probe(replace(PLAIN, solarize_p=p, solarize_threshold=0.5), (200, 100, 30))[0]
        hit = (y[:, 0, 0, 0] - 55).abs() < 1e-3
        assert ((y[:, 0, 0, 0] - 200).abs() < 1e-3)[~hit].all()
        assert ((y[:, 2, 0, 0] - 30).abs() < 1e-3).all()  # below the threshold: never inverted
    elif op == "flip":
        ramp = (torch.arange(8, dtype=torch.uint8) * 30).view(1, 8, 1).expand(8, 8, 3).contiguous()
        y = _probe(replace(PLAIN, flip_p=p), None, image=ramp)[0]
        hit = y[:, 0, 0, 0] > y[:, 0, 0, 7]
    else:  # an impulse: blurred (sigma >= 0.5) or not
        img = torch.zeros(8, 8, 3, dtype=torch.uint8)
        img[4, 4] = 255
        y = _probe(replace(PLAIN, blur_p=p, blur_sigma=(0.5, 2.0)), None, image=img)[0]
        hit = y[:, 0, 4, 4] < 255 - 1e-3
    _assert_freq(hit, p)


def test_blur_sigma_distribution():
    """An impulse through a 3-tap blur keeps w_c^2 at its centre, w_c = 1 / (1 + 2 exp(-1 / (2 sigma^2))): a
    decreasing function of sigma, so P(centre <= value(s)) = P(sigma >= s) = (2 - s) / 1.9 for sigma ~ U(0.1, 2)."""
    img = torch.zeros(8, 8, 3, dtype=torch.uint8)
    img[4, 4] = 255
    y = _probe(replace(PLAIN, blur_p=1.0, blur_sigma=(0.1, 2.0)), None, image=img)[0]
    centre = y[:, 0, 4, 4] / 255
    for s in (0.3, 0.7, 1.0, 1.5, 1.9):
        w_c = 1 / (1 + 2 * math.exp(-1 / (2 * s * s)))
        _assert_freq(centre <= w_c ** 2, (2.0 - s) / 1.9)


def test_copies_views_and_ops_draw_independently():
    """count = 2: each copy grey with p = 0.5, both with 0.25 (not 0.5: fresh randomness per copy); the views of
    a two-view spec likewise; and within a view, every op has its own coin (jitter & grey, flip & solarize)."""
    y = _probe(replace(PLAIN, grayscale_p=0.5), (200, 100, 30), count=2)
    grey = (y[:, :, 0] == y[:, :, 2]).flatten(2).all(2)  # (2, n)
    _assert_freq(grey[0], 0.5)
    _assert_freq(grey[1], 0.5)
    _assert_freq(grey[0] & grey[1], 0.25)
    spec = AugmentSpec((replace(PLAIN, grayscale_p=0.5), replace(PLAIN, grayscale_p=0.5, flip_p=0.5)))
    a, b = ga.BatchAugment(spec)(torch.tensor((200, 100, 30), dtype=torch.uint8).expand(N_PROBE, 8, 8, 3),
                                 torch.Generator().manual_seed(3))
    _assert_freq((a[:, 0] == a[:, 2]).flatten(1).all(1) & (b[:, 0] == b[:, 2]).flatten(1).all(1), 0.25)
    # brightness jitter and grayscale on (150, 100, 50): grey = equal channels; jittered = G (or the grey level) moved
    view = replace(PLAIN, jitter_p=0.5, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.5)
    y = _probe(view, (150, 100, 50))[0][:, :, 0, 0]
    grey = y[:, 0] == y[:, 2]
    grey_level = 0.2989 * 150 + 0.587 * 100 + 0.114 * 50
    jittered = torch.where(grey, (y[:, 1] - grey_level).abs() > 1e-3, (y[:, 1] - 100).abs() > 1e-3)
    _assert_freq(grey, 0.5)
    _assert_freq(jittered, 0.5)
    _assert_freq(grey & jittered, 0.25)
    # solarize and flip on a ramp 0, 30, .., 210: solarized = nothing left >= 128; flipped = first > last
    ramp = (torch.arange(8, dtype=torch.uint8) * 30).view(1, 8, 1).expand(8, 8, 3).contiguous()
    y = _probe(replace(PLAIN, solarize_p=0.5, flip_p=0.5), None, image=ramp)[0][:, 0, 0]
    solarized, flipped = y.amax(1) < 128, y[:, 0] > y[:, 7]
    _assert_freq(solarized, 0.5)
    _assert_freq(flipped, 0.5)
    _assert_freq(solarized & flipped, 0.25)


def test_crop_boxes_through_batch_augment():
    """The boxes ``BatchAugment`` crops with, read back exactly: a 32x32 image with R = 8 x column and G = 8 x row,
    cropped at scale (0.2, 1) and resized to 32 px. A crop of w <= 32 columns upsampled to 32 samples source
    positions from 0 (clamped) to w - 1 (clamped), so R spans 8 (w - 1): w = span / 8 + 1, left = min / 8."""
    col = torch.arange(32, dtype=torch.uint8) * 8
    img = torch.stack([col.view(1, 32).expand(32, 32), col.view(32, 1).expand(32, 32),
                       torch.zeros(32, 32, dtype=torch.uint8)], -1)
    n = 3000
    view = replace(PLAIN, size=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)
    (y,) = ga.BatchAugment(AugmentSpec((view,)))(img.expand(n, 32, 32, 3).contiguous(),
                                                 torch.Generator().manual_seed(4))
    y = y.double() * 255
    r, g = y[:, 0], y[:, 1]
    left, top = r.amin((1, 2)) / 8, g.amin((1, 2)) / 8
    w, h = (r.amax((1, 2)) - r.amin((1, 2))) / 8 + 1, (g.amax((1, 2)) - g.amin((1, 2))) / 8 + 1
    boxes = torch.stack([top, left, h, w], 1)
    assert (boxes - boxes.round()).abs().max() < 1e-3  # whole pixels: the box is read back exactly
    got = _box_stats(boxes.round().numpy(), 32, 32)
    ref = _box_stats(_torchvision_boxes(n, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), seed=2), 32, 32)
    for key in got:  # alpha = 1e-3 for 3000 vs 3000
        assert _ks(got[key], ref[key]) < 1.95 * math.sqrt(2 / n), key
    _assert_freq(r[:, 0, 0] > r[:, 0, -1], 0.5)  # flipped: R decreases along the row


# ============ 3. BatchAugment end to end ============

PRESETS = {
    "mocov2_aug_plus": lambda: augment.mocov2_aug_plus(32, MEAN, STD, blur_p=0.0),
    "simclr": lambda: augment.simclr(32, blur_p=0.0),
    "byol": lambda: augment.byol(32),
    "dino": lambda: augment.multicrop(32, 16, 4, mean=MEAN, std=STD, asymmetric=True),
    "swav": lambda: augment.multicrop(32, 16, 4, mean=MEAN, std=STD, asymmetric=False),
}


def _batch(n=6, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_presets_shapes_dtypes_layout(name, dtype, channels_last):
    spec = PRESETS[name]()
    aug = ga.BatchAugment(spec, out_dtype=dtype, channels_last=channels_last)
    views = aug(_batch(), torch.Generator().manual_seed(0))
    assert len(views) == spec.num_views
    for v, vs in zip(views, spec.expanded()):
        assert v.shape == (6, 3, vs.size, vs.size) and v.dtype == dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert v.is_contiguous(memory_format=fmt)
        assert torch.isfinite(v.float()).all()
    # weird shapes: a non-square source larger than the views, batch of 1
    views = ga.BatchAugment(spec)(_batch(1, 40, 48), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(1, 3, vs.size, vs.size) for vs in spec.expanded()]


def test_bad_input_raises():
    aug = ga.BatchAugment(PRESETS["simclr"]())
    with pytest.raises(ValueError, match="uint8"):
        aug(_batch().float())
    with pytest.raises(ValueError, match="uint8"):
        aug(_batch().permute(0, 3, 1, 2))


def test_normalization_of_grey():
    spec = AugmentSpec((replace(PLAIN, size=32, mean=MEAN, std=STD),))
    (y,) = ga.BatchAugment(spec)(torch.full((3, 32, 32, 3), 128, dtype=torch.uint8))
    ref = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(y, ref.view(1, 3, 1, 1).expand(3, 3, 32, 32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["mocov2_aug_plus", "dino"])
def test_seeded_determinism(name):
    aug = ga.BatchAugment(PRESETS[name]())
    x = _batch(16)
    a = aug(x, torch.Generator().manual_seed(123))
    b = aug(x, torch.Generator().manual_seed(123))
    c = aug(x, torch.Generator().manual_seed(124))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(not torch.equal(u, v) for u, v in zip(a, c))
    assert not torch.equal(a[0], a[1])  # the two copies of a view differ
    torch.manual_seed(5)  # generator None: the default generator
    d = aug(x)
    torch.manual_seed(5)
    assert all(torch.equal(u, v) for u, v in zip(d, aug(x)))


@pytest.mark.parametrize("extra", [{}, {"flip_p": 1.0}, {"solarize_p": 1.0, "solarize_threshold": 0.6}])
def test_deterministic_views_equal_torchvision(extra):
    """Every probability 0 (or 1), scale = ratio = 1: torchvision's pipeline (``build_view_transform``) on the same
    uint8 images is deterministic, and this module's output equals it, for each of 3 copies of the view (copy j
    of sample i is made from image i)."""
    view = replace(PLAIN, size=32, mean=MEAN, std=STD, **extra)
    x = _batch(5, seed=1)
    views = ga.BatchAugment(AugmentSpec((view,), (3,)))(x, torch.Generator().manual_seed(0))
    t = build_view_transform(view)
    ref = torch.stack([t(img.permute(2, 0, 1).contiguous()) for img in x])
    assert len(views) == 3
    for got in views:
        assert _maxdiff(got, ref) <= 1e-6
    assert _maxdiff(views[0], ref[[1, 2, 3, 4, 0]]) > 0.5  # (the check can tell the images apart)


def test_pipeline_statistics_match_torchvision():
    """MoCo v2 aug+ (jitter, grayscale, crop, flip) on one CIFAR-like image, 600 views from each back end: the mean
    and spread of each channel agree, as does the fraction of grey views. Tolerances: 4 standard errors of the
    per-view statistic plus ~1.5 grey levels (torchvision's uint8 ops truncate after each jitter op)."""
    g = torch.Generator().manual_seed(11)
    # a smooth image with colour: channel gradients plus noise
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = torch.stack([40 + 5 * xx, 200 - 4 * yy, 90 + 2 * (xx + yy)], -1) + 10 * torch.randn(32, 32, 3, generator=g)
    img = img.clamp(0, 255).round().to(torch.uint8)
    view = augment.mocov2_aug_plus(32, (0.0,) * 3, (1.0,) * 3, blur_p=0.0).views[0]
    n = 600
    (got,) = ga.BatchAugment(AugmentSpec((view,)))(img.expand(n, 32, 32, 3).contiguous(),
                                                   torch.Generator().manual_seed(0))
    t = build_view_transform(view)
    torch.manual_seed(0)
    ref = torch.stack([t(img.permute(2, 0, 1).contiguous()) for _ in range(n)])
    for stat in (lambda v: v.mean((2, 3)), lambda v: v.std((2, 3))):
        a, b = stat(got), stat(ref)  # (n, 3)
        se = torch.sqrt(a.var(0) / n + b.var(0) / n)
        assert ((a.mean(0) - b.mean(0)).abs() <= 4 * se + 1.5 / 255).all(), (a.mean(0), b.mean(0), se)
    grey_a = (got[:, 0] - got[:, 2]).abs().flatten(1).amax(1) < 1e-6
    grey_b = (ref[:, 0] - ref[:, 2]).abs().flatten(1).amax(1) < 1e-6
    assert abs(grey_a.double().mean() - grey_b.double().mean()) <= 4 * math.sqrt(0.2 * 0.8 * 2 / n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_deterministic():
    """Same code on the GPU: the functional ops equal the CPU's, and a seeded CUDA generator reproduces the batch."""
    x = _images(48, h=6, w=7, seed=4)
    g = torch.Generator().manual_seed(5)
    f = [0.2 + 1.6 * torch.rand(48, generator=g) for _ in range(3)] + [torch.rand(48, generator=g) - 0.5]
    cpu = ga.color_jitter(x, *f, order=ORDERS)
    gpu = ga.color_jitter(x.cuda(), *(t.cuda() for t in f), order=ORDERS.cuda())
    assert _maxdiff(gpu.cpu(), cpu) <= ATOL
    sigma = torch.rand(48, generator=g) * 1.9 + 0.1
    assert _maxdiff(ga.gaussian_blur(x.cuda(), sigma.cuda(), 5).cpu(), ga.gaussian_blur(x, sigma, 5)) <= ATOL
    top, left, h, w = _crop_cases()
    xc = _images(len(top), h=20, w=27)
    assert _maxdiff(ga.resized_crop(xc.cuda(), top.cuda(), left.cuda(), h.cuda(), w.cuda(), 32).cpu(),
                    ga.resized_crop(xc, top, left, h, w, 32)) <= ATOL
    aug = ga.BatchAugment(PRESETS["dino"](), out_dtype=torch.bfloat16, channels_last=True)
    xb = _batch(64).cuda()
    a = aug(xb, torch.Generator("cuda").manual_seed(1))
    b = aug(xb, torch.Generator("cuda").manual_seed(1))
    assert all(torch.equal(u, v) and u.is_cuda for u, v in zip(a, b))
