"""DALI colour jitter (``fastcl.data.dali._color_affine``, ``_hue_shift`` and the whole ``_color_jitter``) pixel by
pixel against torchvision's functional ops in float64.

``test_dali.py`` reads the jitter factors back from uniform probes (their distributions); these pin the maps
themselves, with fixed per-sample factors, on every hue: a hue wheel (all six sectors at several saturations
and values), random pixels, and edge cases (greys, ties for the max channel, primaries, near-greys).
On CUDA the same checks run on the GPU operators (the graph the GPU pipeline trains with).
"""
from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
from torchvision.transforms.v2 import functional as F  # noqa: E402

from fastcl.data import dali as fdali  # noqa: E402

DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the GPU arithmetic operators")])]
ATOL = 2e-3  # grey levels: DALI computes in float32, the references in float64
# where torchvision's grey level enters: it weighs red 0.2989, fastcl.data.dali (ITU-R 601) 0.299
ATOL_LUMA = ATOL + 1e-4 * 255


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n 18x18 uint8 images: a hue wheel (18 hues x 6 saturation/value pairs x 3), random pixels, edge cases."""
    rng = np.random.default_rng(seed)
    wheel = np.array([[colorsys.hsv_to_rgb(h / 18, s, v) for h in range(18)]
                      for s, v in itertools.product((1.0, 0.5, 0.1), (1.0, 0.6)) for _ in range(3)])
    wheel = np.round(wheel * 255).astype(np.uint8)  # (18, 18, 3)
    edge = np.array([[g, g, g] for g in (0, 1, 128, 255)]
                    + [[200, 200, 50], [200, 50, 200], [50, 200, 200],  # ties for the max channel
                       [50, 50, 200], [50, 200, 50], [200, 50, 50],  # ties for the min channel
                       [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
                       [200, 199, 198], [3, 2, 1], [254, 255, 255], [0, 0, 1]], np.uint8)
    imgs = [wheel.copy()] + [rng.integers(0, 256, (18, 18, 3), dtype=np.uint8) for _ in range(n - 1)]
    imgs[1].reshape(-1, 3)[:len(edge)] = edge
    return imgs


def _run(imgs: list[np.ndarray], device: str, build, *params) -> np.ndarray:
    """``build(img, float rgb planes, *per-sample scalar nodes)`` -> 3 planes or one HWC image, run once over
    ``imgs``; returns (B, H, W, 3)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=0 if device == "gpu" else None)
    def pipe():
        img = fn.external_source(source=lambda: imgs, batch=True, layout="HWC")
        if device == "gpu":
            img = img.gpu()
        scalars = [fn.external_source(source=_batch_of(p), batch=True) for p in params]
        planes = [fn.cast(img[:, :, ch], dtype=types.FLOAT) for ch in range(3)]
        return tuple(build(img, planes, *scalars))

    p = pipe()
    p.build()
    outs = [o.as_cpu() if hasattr(o, "as_cpu") else o for o in p.run()]
    if len(outs) == 1:
        return np.stack([np.asarray(outs[0].at(i)) for i in range(len(imgs))])
    return np.stack([np.stack([np.asarray(o.at(i)) for o in outs], -1) for i in range(len(imgs))])


def _batch_of(values):
    batch = [np.float32(x) for x in values]
    return lambda: batch  # (no argument: DALI passes iteration info to a callable that takes one)


def _tv(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).double() / 255


def _np(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy() * 255


# ============ hue ============

@pytest.mark.parametrize("device", DEVICES)
def test_hue_shift_matches_torchvision(device):
    imgs = _images(21)
    turns = np.linspace(-0.5, 0.5, len(imgs))  # 0 and both limits included
    got = _run(imgs, device, lambda img, planes, t: fdali._hue_shift(planes, t), turns)
    for img, t, out in zip(imgs, turns, got):
        ref = _np(F.adjust_hue(_tv(img), float(t)))
        np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL, err_msg=f"turns={t}")


def test_hue_shift_keeps_value_and_chroma():
    """HSV hue shift changes only H: max and max - min of every pixel are kept (the paper-free invariant)."""
    imgs = _images(8, seed=1)
    turns = np.random.default_rng(1).uniform(-0.5, 0.5, len(imgs))
    got = _run(imgs, "cpu", lambda img, planes, t: fdali._hue_shift(planes, t), turns)
    src = np.stack(imgs).astype(np.float64)
    np.testing.assert_allclose(got.max(-1), src.max(-1), atol=ATOL)
    np.testing.assert_allclose(got.max(-1) - got.min(-1), src.max(-1) - src.min(-1), atol=ATOL)


# ============ brightness / contrast / saturation ============

def _affine(img, planes, b, c, s):
    return fdali._color_affine(planes, img, b, c, s)


@pytest.mark.parametrize("device", DEVICES)
def test_color_affine_equals_torchvision_in_every_order(device):
    """Factors <= 1 never clip, so torchvision's result is the same in all 6 orders, and equal to the one map."""
    imgs = _images(12, seed=2)
    rng = np.random.default_rng(2)
    b, c, s = (rng.uniform(0.6, 1.0, len(imgs)) for _ in range(3))
    b[1], c[2], s[3] = 0.0, 0.0, 0.0  # black, flat mean grey, grey
    b[4] = c[4] = s[4] = 1.0  # identity
    got = _run(imgs, device, _affine, b, c, s)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for k, img in enumerate(imgs):
        for order in itertools.permutations(range(3)):
            x = _tv(img)
            for i in order:
                x = ops[i](x, float((b, c, s)[i][k]))
            np.testing.assert_allclose(got[k], _np(x), rtol=0, atol=ATOL_LUMA, err_msg=f"image {k}, order {order}")


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_each_color_op_alone_equals_torchvision_with_clipping(name):
    """One op is one clamp in both: factors up to 2 (clipping) match torchvision exactly."""
    imgs = _images(10, seed=3)
    factors = np.linspace(0.0, 2.0, len(imgs))
    op = getattr(F, f"adjust_{name}")
    got = _run(imgs, "cpu", lambda img, planes, f: fdali._color_affine(planes, img, **{name: f}), factors)
    for img, f, out in zip(imgs, factors, got):
        np.testing.assert_allclose(out, _np(op(_tv(img), float(f))), rtol=0, atol=ATOL_LUMA, err_msg=f"factor {f}")


def test_color_affine_with_clipping_is_the_composed_map_clamped_once():
    """Factors above 1: DALI evaluates clamp(b c s x + b c (1 - s) Y + b (1 - c) m) (m = mean grey of the image),
    here in float64. (That this composed map is torchvision's is what the two tests above check.)"""
    imgs = _images(12, seed=4)
    rng = np.random.default_rng(4)
    b, c, s = (rng.uniform(0.5, 1.6, len(imgs)) for _ in range(3))
    got = _run(imgs, "cpu", _affine, b, c, s)
    luma = np.array(fdali._LUMA)
    for k, img in enumerate(imgs):
        x = img.astype(np.float64)
        grey = x @ luma
        ref = b[k] * c[k] * s[k] * x + (b[k] * c[k] * (1 - s[k]) * grey + b[k] * (1 - c[k]) * grey.mean())[..., None]
        np.testing.assert_allclose(got[k], np.clip(ref, 0, 255), rtol=0, atol=ATOL)


# ============ the whole jitter: uint8 in, uint8 out ============

JITTER_CASES = {  # which of (brightness, contrast, saturation, hue) are on
    "hue": (False, False, False, True), "brightness": (True, False, False, False),
    "contrast": (False, True, False, False), "saturation": (False, False, True, False), "all": (True,) * 4,
}


@pytest.mark.parametrize("case", list(JITTER_CASES))
def test_color_jitter_rounds_torchvision_float_once(case):
    """``_color_jitter`` as the pipeline runs it (uint8 planes in, one rounding to uint8 out) against torchvision's
    float ops in the order b, c, s, h, rounded: at most 1 grey level apart, and exact on >= 99% of values (the
    float32 / float64 difference flips a rounding now and then). Factors <= 1 so that no intermediate value clips."""
    on = JITTER_CASES[case]
    imgs = _images(16, seed=5)
    rng = np.random.default_rng(5)
    params = [rng.uniform(0.5, 1.0, len(imgs)) for _ in range(3)] + [rng.uniform(-0.5, 0.5, len(imgs))]
    used = [p for p, flag in zip(params, on) if flag]

    def build(img, planes, *scalars):
        it = iter(scalars)
        return (fdali._color_jitter(img, *(next(it) if flag else None for flag in on[:3]),
                                    hue_turns=next(it) if on[3] else None),)

    got = _run(imgs, "cpu", build, *used).astype(np.int64)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    refs = []
    for k, img in enumerate(imgs):
        x = _tv(img)
        for op, p, flag in zip(ops, params, on):
            x = op(x, float(p[k])) if flag else x
        refs.append(np.round(_np(x)))
    diff = np.abs(got - np.stack(refs))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.99
