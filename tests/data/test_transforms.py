import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from fastcl.data import augment
from fastcl.data.augment import ViewSpec
from fastcl.data.transforms import MultiViewTransform, build_view_transform, eval_transform

# A view with every random op off and an identity crop; tests switch on one op at a time.
# mean 0 / std 1/255 makes the output the uint8 pixel values as float.
PLAIN = ViewSpec(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                 solarize_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


def _colour_image(h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


PRESETS = {
    "mocov1": lambda: augment.mocov1(32),
    "mocov2_aug_plus": lambda: augment.mocov2_aug_plus(32),
    "simclr": lambda: augment.simclr(32, blur_p=0.0),
    "byol": lambda: augment.byol(32),
    "dino": lambda: augment.multicrop(32, 16, n_local=3, asymmetric=True),
    "swav": lambda: augment.multicrop(32, 16, n_local=2, asymmetric=False),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kind", ["uint8", "pil"])
def test_preset_shapes_and_dtypes(name, kind):
    spec = PRESETS[name]()
    t = MultiViewTransform(spec)
    img = _colour_image(40, 48)  # weird shapes: non-square input larger than the view
    if kind == "pil":
        img = Image.fromarray(img.permute(1, 2, 0).numpy())
    views = t(img)
    assert len(views) == spec.num_views == len(t)
    for v, vs in zip(views, spec.expanded()):
        assert type(v) is not Image.Image
        assert v.dtype == torch.float32 and tuple(v.shape) == (3, vs.size, vs.size)
        assert torch.isfinite(v).all()


def test_identity_view_is_normalised_input():
    x = _colour_image()
    out = build_view_transform(PLAIN)(x)
    torch.testing.assert_close(out, x.float(), atol=1e-3, rtol=0)  # x/255 then /(1/255): fp rounding only
    spec = replace(PLAIN, mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD)
    ref = (x.float() / 255 - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    torch.testing.assert_close(build_view_transform(spec)(x), ref)


def test_grayscale_frequency():
    # p(gray) = 0.3 over 2000 draws: std of the estimate is 0.010, allow ~5 sigma
    t = build_view_transform(replace(PLAIN, size=8, grayscale_p=0.3))
    x = _colour_image(8, 8)
    torch.manual_seed(0)
    gray = sum(bool((y[0] == y[1]).all() and (y[1] == y[2]).all()) for y in (t(x) for _ in range(2000)))
    assert abs(gray / 2000 - 0.3) < 0.05
    assert all(isinstance(op, v2.RandomGrayscale) is False for op in build_view_transform(PLAIN).transforms)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0), (0.05, 0.32)])
def test_crop_area_fraction_within_scale(scale):
    # 128x128 image with R = 2*column, G = 2*row: the output's value range measures the crop box.
    n = 128
    ramp = torch.arange(0, 2 * n, 2, dtype=torch.uint8)
    img = torch.stack([ramp.expand(n, n), ramp[:, None].expand(n, n), torch.zeros(n, n, dtype=torch.uint8)])
    out_size = 32
    t = build_view_transform(replace(PLAIN, size=out_size, scale=scale, ratio=(3 / 4, 4 / 3)))
    torch.manual_seed(1)
    fracs, ratios = [], []
    for _ in range(200):
        y = t(img)
        # output pixel centres sit half an output pixel inside the crop edges
        w = (y[0].max() - y[0].min()).item() / 2 * out_size / (out_size - 1)
        h = (y[1].max() - y[1].min()).item() / 2 * out_size / (out_size - 1)
        fracs.append(w * h / n ** 2)
        ratios.append(w / h)
    fracs, ratios = np.array(fracs), np.array(ratios)
    lo, hi = scale
    # bilinear + antialias blur the edges by ~1 px of 128: loosened by 0.02 absolute / 3%
    assert fracs.min() >= lo * 0.97 - 0.02 and fracs.max() <= min(1.0, hi * 1.03 + 0.02)
    assert fracs.min() < lo + 0.1 * (hi - lo)  # the range is actually explored
    assert fracs.max() > hi - 0.15 * (hi - lo)
    assert ratios.min() >= 3 / 4 * 0.95 and ratios.max() <= 4 / 3 * 1.05


@pytest.mark.parametrize("kind", ["uint8", "float", "pil"])
def test_solarize_threshold_scale(kind):
    ramp = torch.arange(256, dtype=torch.uint8).reshape(16, 16).expand(3, 16, 16).contiguous()
    expected = torch.where(ramp >= 128, 255 - ramp, ramp).float()
    t = build_view_transform(replace(PLAIN, size=16, solarize_p=1.0, solarize_threshold=0.5))
    if kind == "uint8":
        out = t(ramp)
    elif kind == "float":
        out = t(ramp.float() / 255)
    else:
        out = t(Image.fromarray(ramp.permute(1, 2, 0).numpy()))
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)


def test_flip_and_blur_wiring():
    x = _colour_image()
    torch.testing.assert_close(build_view_transform(replace(PLAIN, flip_p=1.0))(x), x.flip(-1).float(),
                               atol=1e-3, rtol=0)
    spec = replace(PLAIN, size=224, blur_p=1.0)
    blur = [op for op in build_view_transform(spec).transforms if isinstance(op, v2.RandomApply)
            and isinstance(op.transforms[0], v2.GaussianBlur)]
    assert len(blur) == 1 and blur[0].p == 1.0
    assert list(blur[0].transforms[0].kernel_size) == [spec.blur_kernel_size] * 2 == [23, 23]
    y = build_view_transform(replace(PLAIN, blur_p=1.0, blur_sigma=(2.0, 2.0)))(x)
    assert y.std() < x.float().std() * 0.8  # blur smooths noise


def test_jitter_changes_pixels_and_views_differ():
    x = _colour_image()
    t = build_view_transform(replace(PLAIN, jitter_p=1.0))
    torch.manual_seed(0)
    assert not torch.equal(t(x), x.float())
    a, b = MultiViewTransform(augment.simclr(32, blur_p=0.0))(x)
    assert not torch.equal(a, b)


def test_eval_transform():
    x = _colour_image()
    t = eval_transform(32, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    ref = (x.float() / 255 - torch.tensor(augment.CIFAR10_MEAN)[:, None, None]) / \
        torch.tensor(augment.CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(t(x), ref)
    big = Image.new("RGB", (400, 300), (10, 200, 30))
    y = eval_transform(224, augment.IMAGENET_MEAN, augment.IMAGENET_STD, resize=256)(big)
    assert y.shape == (3, 224, 224) and y.dtype == torch.float32
    assert math.isclose(y[1].mean().item(), (200 / 255 - 0.456) / 0.224, rel_tol=1e-4)
