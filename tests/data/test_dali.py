"""DALI back end (``fastcl.data.dali``) in CPU mode: the same pipeline code the GPU runs.

Statistical probes (each view is read back to the parameter that produced it):
- crop geometry: a 256x256 PNG with R = x, G = y; the slope of R across a view's columns times the
  view size is the crop width in source pixels (likewise G / rows / height), its sign the flip;
- colour jitter: a uniform colour; brightness / contrast / saturation factors are read back from one
  channel, the hue shift from the HSV hue;
- grayscale: R == G == B; solarize: a 3-band image (200 | 128 | 127) inverted from 128 up;
- blur: vertical sinusoid stripes of period T; a Gaussian of sigma s multiplies their amplitude by
  sum_i w_i cos(2 pi i / T) (w = the normalised window), inverted numerically to read s back.
Every distribution is compared with the spec (torchvision's ``RandomResizedCrop.get_params`` for
crops, U[...] for factors) and, where ``fastcl.data.transforms`` is importable, with the torchvision
twin through the same probe. Tolerances: KS distance 0.1 (n >= 512: the 99.9% critical value for two
samples of 512 is 0.086) and 4 binomial standard deviations for frequencies.
"""
from __future__ import annotations

import colorsys
import os
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
from fastcl.data import augment  # noqa: E402
from fastcl.data.augment import AugmentSpec, ViewSpec  # noqa: E402
from fastcl.data.dali import DaliLoader, check_image_header, dali_available  # noqa: E402
from fastcl.data.loader import shard_batches  # noqa: E402

try:
    from fastcl.data.transforms import MultiViewTransform
except ImportError:  # the torchvision twin is optional for these tests
    MultiViewTransform = None

NOAUG = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0,
             mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # output = pixel value in [0, 255]
N_COPIES = 64  # files per probe folder; one batch of 64 samples x 8 views = 512 views per epoch
KS_TOL = 0.1
twin = pytest.mark.skipif(MultiViewTransform is None, reason="fastcl.data.transforms not importable")


def ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def freq_ok(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9


# ============ fixtures ============

def _folder(root, name: str, arr: np.ndarray, n: int = N_COPIES) -> str:
    d = os.path.join(root, name, "c0")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(arr).save(os.path.join(d, "img_000.png"))
    for k in range(1, n):
        shutil.copy(os.path.join(d, "img_000.png"), os.path.join(d, f"img_{k:03d}.png"))
    return os.path.join(root, name)


def _uniform(rgb, size=16) -> np.ndarray:
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = rgb
    return a


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("probes"))
    x = np.arange(256, dtype=np.uint8)
    grad = np.stack(np.broadcast_arrays(x[None, :], x[:, None], np.full((256, 256), 128, np.uint8)), -1).copy()
    bands = np.zeros((24, 24, 3), np.uint8)
    bands[:, :8], bands[:, 8:16], bands[:, 16:] = 200, 128, 127
    col = np.arange(48)
    stripes = np.repeat((127.5 + 100 * np.cos(2 * np.pi * col / 16)).round().astype(np.uint8)[None, :, None], 48, 0)
    return {
        "grad": _folder(root, "grad", grad),
        "dark": _folder(root, "dark", _uniform((100, 60, 40))),
        "vivid": _folder(root, "vivid", _uniform((230, 30, 30))),
        "red": _folder(root, "red", _uniform((200, 50, 50))),
        "bands": _folder(root, "bands", bands),
        "stripes": _folder(root, "stripes", np.repeat(stripes, 3, 2).copy()),
    }


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """37 small real-photo JPEGs in 3 classes (odd count on purpose: sharding remainders)."""
    from fastcl.data.fixtures import make_synthetic_imagefolder
    try:
        root = make_synthetic_imagefolder(tmp_path_factory.mktemp("synth"), n_classes=3, per_class=12,
                                          size=(80, 60), seed=1)
    except RuntimeError as err:  # offline without a cached foolbox wheel
        pytest.skip(str(err))
    shutil.copy(root / "class_002" / "img_00000.jpg", root / "class_002" / "img_00012.jpg")
    return root


def dali_views(root, view: ViewSpec, n_views: int = 8, epochs: int = 1, **kw) -> torch.Tensor:
    dl = DaliLoader(root, AugmentSpec((view,), (n_views,)), N_COPIES, num_threads=2, **kw)
    out = []
    for e in range(epochs):
        dl.set_epoch(e)
        for views, _, _ in dl:
            out += views
    return torch.cat(out).float()


def twin_views(root, view: ViewSpec, n: int) -> torch.Tensor:
    img = Image.open(os.path.join(root, "c0", "img_000.png")).convert("RGB")
    t = MultiViewTransform(AugmentSpec((view,), (n,)))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-image ops: intra-op threads only add overhead
    try:
        return torch.stack(t(img)).float()
    finally:
        torch.set_num_threads(threads)


# ============ shapes / dtypes / layouts per preset ============

PRESETS = {
    "mocov2": augment.mocov2_aug_plus(size=64),
    "byol": augment.byol(size=64),
    "dino": augment.multicrop(global_size=64, local_size=32, n_local=4),
    "swav": augment.multicrop(global_size=64, local_size=32, n_local=6, asymmetric=False),
}


def test_dali_available():
    assert dali_available()


def test_real_progressive_imagenet_jpegs(tmp_path):
    from fastcl.data.fixtures import imagenet_sample_jpegs
    try:
        jpegs = imagenet_sample_jpegs()
    except RuntimeError as err:
        pytest.skip(str(err))
    (tmp_path / "c0").mkdir()
    for p in jpegs:
        shutil.copy(p, tmp_path / "c0" / p.name)
    dl = DaliLoader(tmp_path, augment.mocov2_aug_plus(size=32), 20, validate="header")
    (views, labels, indices), = list(dl)
    assert dl.num_bad_files == 0 and sorted(indices.tolist()) == list(range(20))
    assert all(torch.isfinite(v).all() and v.std() > 0.1 for v in views)


@pytest.mark.parametrize("preset", ["mocov1", "mocov2_aug_plus", "simclr", "byol", "multicrop"])
@pytest.mark.parametrize("decode", ["fused", "once"])
def test_gpu_pipeline_graph_builds_without_a_gpu(preset, decode):
    """The GPU graph (mixed decode, GPU operators) traced without a device: DALI rejects there a GPU node passed
    as a named argument (brightness_contrast's contrast_center once was), and every operator instance must have
    a kernel registered for its placement (a CPU-only operator fed a GPU node traces fine but cannot run).
    Shapes, dtypes and branch merges are not checked by tracing: the CPU twin runs the same graph for those;
    running it on a GPU needs CUDA (test_gpu_pipeline, test_dali_color.py)."""
    from nvidia.dali.ops import _registry
    from fastcl.data.dali import build_pipeline
    registered = {"cpu": _registry.cpu_ops(), "gpu": _registry.gpu_ops(), "mixed": _registry.mixed_ops()}

    def no_data(_=None):
        raise StopIteration

    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, True)):
        pipe = build_pipeline(getattr(augment, preset)(), 4, no_data, device_id=0, decode=decode, dtype=dtype,
                              channels_last=channels_last)
        pipe._build_graph()  # (private: Pipeline.build() would also allocate the device)
        placed = {(getattr(o._op, "schema_name", None) or type(o._op).__name__, o._op.device) for o in pipe._ops}
        assert ("decoders__Image" if decode == "once" else "decoders__ImageRandomCrop", "mixed") in placed
        assert not [(name, dev) for name, dev in placed if name not in registered[dev]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: mixed (nvJPEG) decode + GPU operators")
@pytest.mark.parametrize("name", ["mocov2", "dino"])  # fused ROI decode / decode once
def test_gpu_pipeline(imagefolder, name):
    spec = PRESETS[name]
    dl = DaliLoader(imagefolder, spec, 8, device="cuda", dtype=torch.bfloat16, channels_last=True)
    dl.set_epoch(1)
    batches = list(dl)
    assert len(batches) == len(dl)
    for views, labels, indices in batches:
        assert [tuple(v.shape) for v in views] == [(8, 3, s.size, s.size) for s in spec.expanded()]
        assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
                   and torch.isfinite(v.float()).all() for v in views)
        assert labels.device.type == indices.device.type == "cpu"
    ref = shard_batches(37, 8, epoch=1)
    assert [i.tolist() for _, _, i in batches] == [b.tolist() for b in ref]


def test_fused_roi_decode_on_jpegs(imagefolder):
    spec = augment.mocov2_aug_plus(size=64)
    views, _, _ = next(iter(DaliLoader(imagefolder, spec, 8, decode="fused")))
    assert [tuple(v.shape) for v in views] == [(8, 3, 64, 64)] * 2
    assert all(torch.isfinite(v).all() and v.std() > 0.1 for v in views)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes(name, imagefolder):
    spec = PRESETS[name]
    dl = DaliLoader(imagefolder, spec, 8)
    assert len(dl) == 37 // 8
    batches = list(dl)
    assert len(batches) == len(dl)
    views, labels, indices = batches[0]
    assert [tuple(v.shape) for v in views] == [(8, 3, s.size, s.size) for s in spec.expanded()]
    assert all(v.dtype == torch.float32 and v.is_contiguous() and v.device.type == "cpu" for v in views)
    assert labels.dtype == indices.dtype == torch.int64 and labels.shape == indices.shape == (8,)
    # normalised: roughly zero-mean, unit-ish spread, finite
    x = torch.cat([v.flatten() for v in views])
    assert torch.isfinite(x).all() and -1.5 < x.mean() < 1.5 and 0.3 < x.std() < 2.0


@pytest.mark.parametrize("dtype, channels_last", [
    (torch.float16, False), (torch.bfloat16, True), (torch.float32, True),
])
def test_dtype_and_channels_last(imagefolder, dtype, channels_last):
    spec = augment.mocov2_aug_plus(size=48)
    ref_dl = DaliLoader(imagefolder, replace_spec(spec, **NOAUG), 4)
    dl = DaliLoader(imagefolder, replace_spec(spec, **NOAUG), 4, dtype=dtype, channels_last=channels_last)
    ref, out = next(iter(ref_dl))[0], next(iter(dl))[0]
    for v, r in zip(out, ref):
        assert v.dtype == dtype and tuple(v.shape) == (4, 3, 48, 48)
        assert v.is_contiguous(memory_format=torch.channels_last) == channels_last
    # the crops are random, so compare value statistics with the fp32 NCHW output, not pixels
    assert abs(out[0].float().mean() - ref[0].mean()) < 40 and out[0].float().max() <= 255.5


def replace_spec(spec: AugmentSpec, **kw) -> AugmentSpec:
    return AugmentSpec(tuple(replace(v, **kw) for v in spec.views), spec.counts)


# ============ statistics vs the spec and the torchvision twin ============

def crop_geometry(v: torch.Tensor):
    """(area fraction, aspect w/h, flipped) per view of the gradient probe."""
    s = v.shape[-1]
    lo, hi = int(s * 0.15), int(s * 0.85)
    c = torch.arange(lo, hi, dtype=torch.float64)
    c -= c.mean()
    r = v[:, 0, lo:hi, lo:hi].double().mean(1)  # R along columns
    g = v[:, 1, lo:hi, lo:hi].double().mean(2)  # G along rows
    slope_r, slope_g = (r * c).sum(1) / (c * c).sum(), (g * c).sum(1) / (c * c).sum()
    w, h = slope_r.abs() * s, slope_g.abs() * s
    return (w * h / 256 ** 2).numpy(), (w / h).numpy(), (slope_r < 0).numpy()


@pytest.mark.parametrize("scale, decode", [
    ((0.08, 1.0), "once"),  # SimCLR/BYOL crops
    ((0.05, 0.32), "once"),  # multi-crop locals
    ((0.08, 1.0), "fused"),  # the GPU default for two views: crop fused with the decode
])
def test_crop_scale_ratio_flip(probes, scale, decode):
    from torchvision.transforms import v2
    view = ViewSpec(size=32, scale=scale, **{**NOAUG, "flip_p": 0.5})
    area, aspect, flipped = crop_geometry(dali_views(probes["grad"], view, decode=decode))
    torch.manual_seed(0)
    ref = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, 256, 256), list(scale), list(view.ratio))
                    for _ in range(4000)], np.float64)
    assert ks(area, ref[:, 2] * ref[:, 3] / 256 ** 2) < KS_TOL
    assert ks(np.log(aspect), np.log(ref[:, 3] / ref[:, 2])) < KS_TOL
    assert area.min() > scale[0] * 0.9 and area.max() < scale[1] * 1.05
    assert freq_ok(flipped.mean(), 0.5, len(flipped))


@twin
def test_crop_matches_torchvision_twin(probes):
    view = ViewSpec(size=32, scale=(0.2, 1.0), **{**NOAUG, "flip_p": 0.5})
    a1, r1, f1 = crop_geometry(dali_views(probes["grad"], view))
    a2, r2, f2 = crop_geometry(twin_views(probes["grad"], view, 512))
    assert ks(a1, a2) < KS_TOL and ks(np.log(r1), np.log(r2)) < KS_TOL
    assert abs(f1.mean() - f2.mean()) < 0.13


JITTER = [  # (strength field, probe, read-back of the factor from the centre pixel's RGB)
    ("brightness", "dark", lambda p: p[0] / 100.0),
    ("contrast", "vivid", lambda p: (GREY_VIVID - p[1]) / (GREY_VIVID - 30.0)),
    ("saturation", "vivid", lambda p: (GREY_VIVID - p[1]) / (GREY_VIVID - 30.0)),
]
GREY_VIVID = 0.299 * 230 + 0.587 * 30 + 0.114 * 30  # mean grey level of the uniform (230, 30, 30)


@pytest.mark.parametrize("field, probe, read", JITTER, ids=[j[0] for j in JITTER])
def test_jitter_factor_distribution(probes, field, probe, read):
    strength, p = 0.4, 0.8
    view = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                    **{**NOAUG, "jitter_p": p, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
                       field: strength})
    pix = dali_views(probes[probe], view)[:, :, 4, 4].numpy()
    f = np.array([read(q) for q in pix])
    unchanged = np.abs(f - 1) < 0.01
    # P(unchanged) = 1 - p, plus the jittered draws within 0.01 of 1
    assert freq_ok(unchanged.mean(), 1 - p + p * 0.02 / (2 * strength), len(f))
    jit = f[~unchanged]
    assert jit.min() > 1 - strength - 0.03 and jit.max() < 1 + strength + 0.03
    u = np.random.default_rng(0).uniform(1 - strength, 1 + strength, 4000)
    assert ks(jit, u[np.abs(u - 1) >= 0.01]) < KS_TOL
    if MultiViewTransform is not None:
        ft = np.array([read(q) for q in twin_views(probes[probe], view, 512)[:, :, 4, 4].numpy()])
        assert ks(f, ft) < KS_TOL


def _hue_shift(pix: np.ndarray) -> np.ndarray:
    h = np.array([colorsys.rgb_to_hsv(*(q / 255.0))[0] for q in pix])
    return (h + 0.5) % 1.0 - 0.5  # the probe's hue is 0 (pure-ish red)


def test_hue_shift_distribution(probes):
    view = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                    **{**NOAUG, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.1})
    dh = _hue_shift(dali_views(probes["red"], view)[:, :, 4, 4].numpy())
    assert np.abs(dh).max() < 0.1 + 0.005  # + uint8 quantisation of the hue
    u = np.random.default_rng(0).uniform(-0.1, 0.1, 4000)
    assert ks(dh, u) < KS_TOL
    if MultiViewTransform is not None:
        dt = _hue_shift(twin_views(probes["red"], view, 512)[:, :, 4, 4].numpy())
        assert ks(dh, dt) < KS_TOL


def test_grayscale_frequency(probes):
    view = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**NOAUG, "grayscale_p": 0.2})
    pix = dali_views(probes["red"], view)[:, :, 4, 4].numpy()
    gray = (np.ptp(pix, axis=1) <= 1)
    assert freq_ok(gray.mean(), 0.2, len(pix))
    grey_level = 0.299 * 200 + 0.587 * 50 + 0.114 * 50
    assert np.all(np.abs(pix[gray] - grey_level) <= 1.5)
    assert np.all(pix[~gray] == [200, 50, 50])


@pytest.mark.parametrize("p", [0.2, 1.0])  # BYOL view 2 / DINO global 2; p=1 takes the static path
def test_solarize_frequency_and_threshold(probes, p):
    view = ViewSpec(size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**NOAUG, "solarize_p": p})
    bands = dali_views(probes["bands"], view)[:, 0, 12, [4, 12, 20]].numpy()
    sol = bands[:, 0] == 55
    assert np.all(sol | (bands[:, 0] == 200))
    assert freq_ok(sol.mean(), p, len(sol))
    assert np.all(bands[sol, 1] == 127) and np.all(bands[~sol, 1] == 128)  # 128 >= 127.5 is inverted
    assert np.all(bands[:, 2] == 127)  # 127 < 127.5 never is


def _stripe_gain(sigma, k: int, period: float = 16.0):
    i = np.arange(k) - (k - 1) / 2
    w = np.exp(-0.5 * (i[None, :] / np.asarray(sigma, np.float64)[:, None]) ** 2)
    w /= w.sum(1, keepdims=True)
    return (w * np.cos(2 * np.pi * i / period)).sum(1)


def blur_sigma_readback(v: torch.Tensor, k: int) -> np.ndarray:
    """Per view: the sigma whose window-k Gaussian gives the measured stripe amplitude (0.1 if none)."""
    x = v[:, 0, 8:-8, 8:-8].double().mean(1).numpy()  # interior rows, away from the borders
    col = np.arange(8, v.shape[-1] - 8)
    basis = np.stack([np.cos(2 * np.pi * col / 16), np.sin(2 * np.pi * col / 16)], 1)
    amp = np.linalg.norm(np.linalg.lstsq(basis, (x - x.mean(1, keepdims=True)).T, rcond=None)[0], axis=0) / 100
    grid = np.linspace(0.05, 2.5, 2000)
    gains = _stripe_gain(grid, k)
    return np.interp(-amp, -gains, grid)  # gains decrease with sigma


def test_blur_frequency_and_sigma(probes):
    p, k = 0.5, ViewSpec(size=48).blur_kernel_size
    view = ViewSpec(size=48, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**NOAUG, "blur_p": p})
    sig = blur_sigma_readback(dali_views(probes["stripes"], view), k)
    # sigma < 0.3 barely changes the stripes (gain > 0.998): count those as "not blurred"
    resolvable = sig > 0.3
    p_res = p * (2.0 - 0.3) / (2.0 - 0.1)
    assert freq_ok(resolvable.mean(), p_res, len(sig))
    u = np.random.default_rng(0).uniform(0.3, 2.0, 4000)
    assert ks(sig[resolvable], u) < KS_TOL
    assert sig.max() < 2.1
    if MultiViewTransform is not None:
        st = blur_sigma_readback(twin_views(probes["stripes"], view, 512), k)
        assert ks(sig, st) < KS_TOL


# ============ sharding, epochs, resume ============

@pytest.mark.parametrize("drop_last", [True, False])
def test_exactly_once_over_two_shards(imagefolder, drop_last):
    spec = augment.mocov2_aug_plus(size=16)
    seen = []
    for rank in range(2):
        dl = DaliLoader(imagefolder, spec, 4, rank=rank, world_size=2, seed=3, drop_last=drop_last)
        dl.set_epoch(5)
        batches = [idx.numpy() for _, _, idx in dl]
        assert len(batches) == len(dl) and all(len(b) > 0 for b in batches)
        # the same batches, in the same order, as the torch back end (TorchLoader)
        ref = shard_batches(37, 4, rank=rank, world_size=2, seed=3, epoch=5, drop_last=drop_last)
        assert [b.tolist() for b in batches] == [b.tolist() for b in ref]
        seen.append(np.concatenate(batches))
    both = np.concatenate(seen)
    assert len(np.unique(both)) == len(both)  # no sample twice
    assert len(both) == (32 if drop_last else 37)  # drop_last: 37 // (2*4) * 8 kept, else all


def test_epoch_boundaries_and_labels(imagefolder):
    dl = DaliLoader(imagefolder, augment.mocov2_aug_plus(size=16), 5, drop_last=False)
    assert len(dl) == 8
    orders = []
    for epoch in range(4):
        dl.set_epoch(epoch)
        idx = [i for _, _, i in dl]
        assert len(idx) == len(dl) and [len(b) for b in idx] == [5] * 7 + [2]
        flat = torch.cat(idx).numpy()
        assert sorted(flat.tolist()) == list(range(37))
        orders.append(flat)
    assert not np.array_equal(orders[0], orders[1])
    # iterating again without set_epoch repeats the epoch (DistributedSampler convention)
    assert np.array_equal(torch.cat([i for _, _, i in dl]).numpy(), orders[3])
    # labels = class of the index
    _, lab, i = next(iter(dl))
    assert torch.equal(lab, torch.as_tensor(dl.targets)[i])


@twin
def test_exif_orientation_treated_as_the_torchvision_twin(tmp_path):
    """A 40x20 JPEG, red left half / blue right, tagged 'rotate 90' (EXIF 6): PIL (the twin) ignores the tag,
    so DALI must too, or its views show another image (red on top, after a fallback centre crop)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0], arr[:, 20:, 2] = 255, 255
    (tmp_path / "c").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "c" / "x.jpg", quality=95, exif=exif)
    view = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(2.0, 2.0), **NOAUG)  # exactly the whole 2:1 image
    (views, _, _), = list(DaliLoader(tmp_path, AugmentSpec((view,)), 1))
    from fastcl.data.imagefolder import ImageFolderDataset

    twin_view = ImageFolderDataset(tmp_path, MultiViewTransform(AugmentSpec((view,))))[0][0][0]
    for out in (views[0][0], twin_view):
        left, right = out[:, :, :6].mean((1, 2)), out[:, :, -6:].mean((1, 2))  # (R, G, B) per side
        assert left[0] > 200 and left[2] < 50 and right[2] > 200 and right[0] < 50, (left, right)


def test_pipeline_reused_when_the_consumer_takes_exactly_len_batches(imagefolder):
    """The Trainer calls next() len(loader) times per epoch and never asks for the end: the pipeline must still
    be reset and reused, not rebuilt (on a GPU: nvJPEG setup and its padded buffers) every epoch."""
    dl = DaliLoader(imagefolder, augment.mocov2_aug_plus(size=16), 5)
    for epoch in range(3):
        dl.set_epoch(epoch)
        it = iter(dl)
        got = [next(it)[2].tolist() for _ in range(len(dl))]
        assert got == [b.tolist() for b in dl.epoch_indices()]
        del it
    assert dl._pipe_count == 1
    dl.set_epoch(3, start_batch=len(dl))  # resumed exactly at an epoch's end: nothing to yield, still reusable
    assert list(dl) == [] and dl._pipe_count == 1
    dl.set_epoch(4)
    assert len(list(dl)) == len(dl) and dl._pipe_count == 1


def test_resume_mid_epoch(imagefolder):
    dl = DaliLoader(imagefolder, augment.mocov2_aug_plus(size=16), 4, rank=1, world_size=2, seed=7)
    dl.set_epoch(2)
    full = [i.tolist() for _, _, i in dl]
    dl.set_epoch(2, start_batch=2)
    assert [i.tolist() for _, _, i in dl] == full[2:]
    # start_batch applies once; abandoning an epoch midway leaves the next one complete
    it = iter(dl)
    next(it)
    del it
    assert [i.tolist() for _, _, i in dl] == full
    stale = iter(dl)
    next(stale)
    assert [i.tolist() for _, _, i in dl] == full  # a newer iteration supersedes the stale one
    with pytest.raises(RuntimeError, match="superseded"):
        next(stale)
    with pytest.raises(ValueError):
        dl.set_epoch(0, start_batch=len(dl) + 1)


# ============ bad input ============

@pytest.fixture(scope="module")
def dirty_folder(tmp_path_factory, imagefolder):
    import io
    d = tmp_path_factory.mktemp("dirty")
    cls = d / "c0"
    cls.mkdir()
    src = Image.open(sorted((imagefolder / "class_000").glob("*.jpg"))[0]).convert("RGB")
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    files = {
        "a_good.jpg": good,
        "b_truncated.jpg": good[: len(good) // 2],
        "c_garbage.jpg": np.random.default_rng(0).bytes(3000),
        "d_empty.jpg": b"",
        "e_bad_header.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 200 + b"\xff\xd9",  # passes the pre-scan
        "f_trailing_junk.jpg": good + b"junk" * 10,
    }
    for name, data in files.items():
        (cls / name).write_bytes(data)
    src.convert("CMYK").save(cls / "g_cmyk.jpg", "JPEG")
    src.convert("L").save(cls / "h_gray.jpg", "JPEG")
    src.save(cls / "i_png_named.jpg", "PNG")
    src.save(cls / "j_progressive.jpg", "JPEG", progressive=True)
    return d


def test_header_check(tmp_path):
    import io

    assert check_image_header("/nonexistent/x.jpg").startswith("unreadable")
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buf, "JPEG")
    good = buf.getvalue()
    (tmp_path / "long_trailer.jpg").write_bytes(good + b"\x00" * 5000)  # camera data after the end marker
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2] + b"\x00" * 5000)
    assert check_image_header(str(tmp_path / "long_trailer.jpg")) is None
    Image.open(tmp_path / "long_trailer.jpg").load()  # (PIL, the torchvision twin, decodes it too)
    assert "truncated" in check_image_header(str(tmp_path / "truncated.jpg"))


def test_corrupt_files_substituted_not_crashing(dirty_folder):
    with pytest.warns(RuntimeWarning, match="pre-scan flagged 3"):
        dl = DaliLoader(dirty_folder, augment.mocov2_aug_plus(size=16), 5, drop_last=False)
    assert {os.path.basename(p) for p in dl.bad_files} == {"b_truncated.jpg", "c_garbage.jpg", "d_empty.jpg"}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches = list(dl)  # e_bad_header fails inside DALI: found, flagged, batch redone
    assert any("e_bad_header" in str(w.message) for w in rec)
    assert dl.num_bad_files == 4 and dl.num_bad_loads >= 4
    idx = torch.cat([i for _, _, i in batches])
    assert sorted(idx.tolist()) == list(range(10))  # every slot served, bad ones by substitutes
    assert all(torch.isfinite(v).all() for views, _, _ in batches for v in views)
    # second epoch: flagged files are no longer decoded, nothing new to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dl.set_epoch(1)
        assert len(list(dl)) == 2
