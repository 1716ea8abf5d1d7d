"""NVIDIA DALI back end of the augmentation spec (``fastcl.data.augment``), with a CPU twin.

The same graph runs on the GPU (``device_id`` set: ``mixed`` nvJPEG decode, GPU augmentation) and on
the CPU (``Pipeline(device_id=None)``, every operator ``device="cpu"``), picked automatically when
CUDA is unavailable, so CI exercises the exact pipeline code that trains on the GPU.

Per ``ViewSpec`` (one DALI branch per output view, in ``spec.expanded()`` order):

    random resized crop     fused ROI decode ``decoders.image_random_crop`` + ``resize`` (``decode="fused"``,
                            default on the GPU for <= 2 views) or one full decode shared by all views +
                            ``random_resized_crop`` (``"once"``: multi-crop, and the CPU twin)
    colour jitter (p)       brightness, contrast (around the image's mean grey level, as torchvision) and
                            saturation as one per-sample affine map (``_color_affine``), then the HSV
                            hue shift (``_hue_shift``), arithmetic on the R, G, B planes; factors ~
                            U[max(0, 1-s), 1+s], hue ~ U[-h, h] turns
    grayscale (p)           ``hsv(saturation=0)`` (Y = .299 R + .587 G + .114 B, 3 channels kept)
    gaussian blur (p)       ``gaussian_blur(window_size=view.blur_kernel_size, sigma ~ U[blur_sigma])``
    solarize (p)            ``lookup_table``: x >= 255 * threshold -> 255 - x
    flip (p) + normalize    ``crop_mirror_normalize`` -> NCHW (or NHWC for ``channels_last``), fp32/fp16;
                            bf16 = fp32 cast by torch

Probabilistic ops are DALI conditionals (``enable_conditionals=True``): a sample that draws "no"
skips the op instead of running it with neutral parameters. Known, documented differences from the
torchvision twin (``fastcl.data.transforms``), all within the statistical tests' tolerances:
brightness, contrast and saturation are one affine map clamped once (torchvision's random order of
the three gives the same result up to intermediate clipping, see ``_color_affine``); the hue shift comes
after them (it commutes with brightness and nearly with the rest); the jittered pixels are rounded to
uint8 once, where torchvision's uint8 ops truncate after each op (the twin's jittered views come out ~1.7
grey levels darker on average where nothing clips); resampling is DALI's antialiased linear filter.

Reading and sharding: the loader reads the ImageFolder index space of
``fastcl.data.imagefolder.ImageFolderDataset`` (sorted classes, sorted files, ``index`` = position)
and shards with ``fastcl.data.loader.shard_batches`` -- the same batches, in the same order, as
``TorchLoader``: one permutation per epoch seeded with ``seed + epoch``, rank ``r`` takes
``perm[r::world_size]``; ``drop_last=True`` gives every rank the same number of full batches.
The batches are fed to DALI through a batch ``external_source`` (file names; ``io.file.read`` reads
the bytes in DALI's threads), which raises ``StopIteration`` after the epoch's last batch: no DALI
reader owns an epoch, so no reader-side epoch accounting can drift (the solo-learn #265 "empty
epoch" class of bugs). ``set_epoch(e, start_batch=k)`` resumes at batch ``k`` of epoch ``e``.

Resume is bit-exact: the pipeline is built with DALI checkpointing, ``state_dict()`` is its
``Pipeline.checkpoint()`` (the random operators' states after the last batch handed out; batches prefetched
past it do not count) and ``load_state_dict(state)`` makes the next pipeline start from it, so a fresh loader
given the state and ``set_epoch(e, k)`` yields the views the saved one would have yielded next. The engine stores
every rank's state in its checkpoints. An iteration abandoned mid-epoch hands its state to the rebuilt pipeline,
so abandoning one does not change the views that follow either.

Bad input: DALI cannot skip a sample inside a running batch (NVIDIA/DALI#3913), so
1. a pre-scan (``validate="header"``, default) reads each file's first and last bytes and flags
   files that are empty, of an unknown format (not JPEG/PNG/BMP/TIFF/WebP/PNM), JPEGs without an
   end-of-image marker (truncated) and PNGs without ``IEND``; a PNG or grayscale/CMYK JPEG under a
   ``.jpg`` name decodes fine and is kept;
2. if the pipeline still raises on a batch, the files of the in-flight batches are decoded
   (bisection) with the same decoder, the culprits are flagged, the pipeline is rebuilt and the
   epoch continues at the failed batch; an error no single file reproduces is re-raised.
A flagged file is never decoded; its slot gets the next good sample in dataset order, with that
sample's label and the *requested* index (the ``ImageFolderDataset`` rule), so batch counts and the
exactly-once accounting are unchanged. ``num_bad_files`` / ``bad_files`` count them, each with a
warning.

>>> from fastcl.data import augment
>>> dl = DaliLoader("/data/imagenet/train", augment.mocov2_aug_plus(), 256, rank=r, world_size=w)  # doctest: +SKIP
>>> for epoch in range(epochs):                                                  # doctest: +SKIP
...     dl.set_epoch(epoch)
...     for (q, k), labels, indices in dl: ...
"""
from __future__ import annotations

from contextlib import nullcontext

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import AugmentSpec, ViewSpec
from .loader import EpochPosition, shard_batches

__all__ = ["dali_available", "DaliLoader", "DaliShardLoader", "build_pipeline", "check_image_header",
           "check_member_header"]


def dali_available() -> bool:
    """True when ``nvidia.dali`` (and its PyTorch plugin) import; selects the ``--data-backend`` default."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime inside the wheel
        return False
    return True


# ============ bad-input pre-scan ============

_TAIL = 4096  # JPEG EOI / PNG IEND must sit within the last 4 KiB (trailing junk beyond that is rare)


def check_image_header(path: str) -> str | None:
    """Cheap structural check of one encoded image: ``None`` if it looks decodable, else the reason.

    Reads the first 16 bytes and the last ``_TAIL`` bytes; no decode.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return _check_encoded(head, tail, size, lambda: _read_all(path))


def check_member_header(f, offset: int, size: int) -> str | None:
    """``check_image_header`` of the ``size`` bytes at ``offset`` of the open binary file ``f`` (a tar member:
    ``ShardIndex`` rows give both); no decode."""
    def read(at: int, n: int) -> bytes:
        f.seek(offset + at)
        return f.read(n)

    try:
        head, tail = read(0, min(16, size)), read(max(0, size - _TAIL), min(size, _TAIL))
        if len(tail) < min(size, _TAIL):
            return "member cut short (the tar file ends inside it)"
        return _check_encoded(head, tail, size, lambda: read(0, size))
    except OSError as err:
        return f"unreadable ({err.strerror or err})"


def _check_encoded(head: bytes, tail: bytes, size: int, read_all) -> str | None:
    if size == 0:
        return "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" in tail:
            return None
        # some cameras append data after the end marker: search the whole file before calling it truncated (a
        # marker inside, e.g. an EXIF thumbnail's, passes a truncated file here; the decode step catches those)
        if size > _TAIL and b"\xff\xd9" in read_all():
            return None
        return "JPEG without end-of-image marker (truncated)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "PNG without IEND chunk (truncated)"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "unknown image format"


def _read_all(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _prescan(paths: Sequence[str], threads: int = 16) -> dict[int, str]:
    with ThreadPoolExecutor(max(1, threads)) as ex:
        reasons = list(ex.map(check_image_header, paths, chunksize=256))
    return {i: r for i, r in enumerate(reasons) if r is not None}


# ============ the DALI graph ============

def _dtype(torch_dtype: torch.dtype):
    from nvidia.dali import types
    if torch_dtype == torch.float16:
        return types.FLOAT16
    if torch_dtype in (torch.float32, torch.bfloat16):  # bf16: fp32 out of DALI, cast by torch
        return types.FLOAT
    raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {torch_dtype}")


def _coin(p: float):
    """A per-sample boolean with P(True) = p (only called for 0 < p < 1)."""
    from nvidia.dali import fn, types
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _factor(strength: float):
    """torchvision ColorJitter factor ~ U[max(0, 1 - s), 1 + s]."""
    from nvidia.dali import fn
    return fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])


# grey level (ITU-R 601). torchvision's rgb_to_grayscale weighs red 0.2989 (sum 0.9999, so its saturation
# darkens greys by up to 1e-4): these sum to 1, which keeps the grey axis fixed as _color_affine assumes
_LUMA = (0.299, 0.587, 0.114)
_CHROMA_EPS = 1e-6  # divisor floor for grey pixels (C = 0: every hue difference is 0, any hue works)


def _jitter(img, v: ViewSpec):
    """ColorJitter(b, c, s, h) on uint8 HWC with per-sample factors ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h]."""
    from nvidia.dali import fn
    factors = [_factor(s) if s > 0 else None for s in (v.brightness, v.contrast, v.saturation)]
    turns = fn.random.uniform(range=[-v.hue, v.hue]) if v.hue > 0 else None
    return _color_jitter(img, *factors, hue_turns=turns)


def _color_jitter(img, brightness=None, contrast=None, saturation=None, hue_turns=None):
    """One affine colour map (brightness, contrast, saturation), then the HSV hue shift, on uint8 HWC; rounded
    to uint8 once. Factors: per-sample scalar nodes, ``None`` = op off.

    Each DALI arithmetic node is one pass over its operands (one kernel on the GPU: DALI does not fuse
    them), so the maps are written as few passes; they run on the three (H, W) channel planes, on which DALI's
    CPU arithmetic costs several times less per element than on the interleaved HWC image (DALI 2.4).
    """
    from nvidia.dali import fn, types
    planes = [img[:, :, ch] for ch in range(3)]
    if brightness is not None or contrast is not None or saturation is not None:
        planes = _color_affine(planes, img, brightness, contrast, saturation)
    else:
        planes = [fn.cast(p, dtype=types.FLOAT) for p in planes]  # uint8 would wrap in the hue's G - B
    if hue_turns is not None:
        planes = _hue_shift(planes, hue_turns)
    return fn.reshape(fn.stack(*(fn.cast(p, dtype=types.UINT8) for p in planes), axis=2), layout="HWC")


def _color_affine(planes, img, brightness=None, contrast=None, saturation=None):
    """torchvision's adjust_brightness, adjust_contrast and adjust_saturation as one affine map, then one clamp
    to [0, 255]. ``planes``: the R, G, B planes of ``img`` (HWC); factors: per-sample scalar nodes or floats,
    ``None`` = 1 (op off). Returns float32 R, G, B planes.

    With m = the mean grey level of the image and Y = the grey level (luma) of a pixel:
    brightness b: x -> b x; contrast c: x -> c x + (1 - c) m (m of the current image); saturation s:
    x -> s x + (1 - s) Y. All three are linear, fix the grey axis and keep the mean grey level consistent
    (b scales it, c and s keep it), so in every order they compose to ``b c s x + b c (1 - s) Y + b (1 - c) m``.
    torchvision applies them in a random order and clamps after each; the single map equals each of its
    orders whenever no intermediate value clips.

    Arithmetic, not ``fn.brightness_contrast``: its ``contrast_center`` is a named argument, which DALI takes
    only from CPU nodes, and after the mixed decode the image (so its mean) lives on the GPU.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    b = 1.0 if brightness is None else brightness
    bc = b if contrast is None else b * contrast
    offset = None  # the grey shared by the three channels
    if saturation is not None:
        luma = _LUMA[0] * planes[0] + _LUMA[1] * planes[1] + _LUMA[2] * planes[2]
        offset = (bc * (1.0 - saturation)) * luma
        bc = bc * saturation
    if contrast is not None:
        mean_grey = fn.reductions.sum(fn.reductions.mean(img, axes=[0, 1]) * types.Constant(np.float32(_LUMA)))
        shift = (b * (1.0 - contrast)) * mean_grey  # per-sample scalar
        offset = shift if offset is None else offset + shift
    out = [bc * p if offset is None else bc * p + offset for p in planes]
    return [dmath.clamp(p, 0.0, 255.0) for p in out]


def _hue_shift(planes, turns):
    """HSV hue shift by ``turns`` (per-sample scalar in [-0.5, 0.5]) of float R, G, B planes in [0, 255]
    (uint8 ones would wrap in G - B), as torchvision's ``adjust_hue``; returns float32 planes. DALI's own
    ``hsv(hue=)`` rotates in YIQ instead, which moves the HSV hue of saturated colours up to 40% further.

    V = max, C = V - min; hue H in sixths from the max channel: R (G-B)/C, G 2 + (B-R)/C, B 4 + (R-G)/C.
    R's offset is 6, not 0, so that tied maxima agree modulo 6 (R=G: 7 and 1, R=B: 5 and 5, G=B: 3 and 3)
    and the largest candidate of a max channel is a right one. Back, with V and C kept: channel n =
    V - C * clamp(min(k, 4 - k), 0, 1), k = (H + n + 6 turns) mod 6, n = 5, 3, 1 for R, G, B.
    """
    import nvidia.dali.math as dmath
    r, g, b = planes
    v = dmath.max(r, dmath.max(g, b))
    c = v - dmath.min(r, dmath.min(g, b))
    inv_c = 1.0 / dmath.max(c, _CHROMA_EPS)
    h = dmath.max(dmath.max((r == v) * ((g - b) * inv_c + 6.0), (g == v) * ((b - r) * inv_c + 2.0)),
                  (b == v) * ((r - g) * inv_c + 4.0))  # in [1, 7]
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h + (turns * 6.0 + (n + 6.0))) % 6.0  # + 6: k >= 0, so % is a true mod
        out.append(v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return out


def _maybe(p: float, op, img, *args):
    """Apply ``op(img, *args)`` with probability p (statically skipped/applied for p in {0, 1})."""
    if p <= 0.0:
        return img
    if p >= 1.0:
        return op(img, *args)
    if _coin(p):
        img = op(img, *args)
    return img


def _gray(img):
    from nvidia.dali import fn
    return fn.hsv(img, saturation=0.0)


def _blur(img, v: ViewSpec):
    from nvidia.dali import fn
    return fn.gaussian_blur(img, window_size=v.blur_kernel_size, sigma=fn.random.uniform(range=list(v.blur_sigma)))


def _solarize(img, v: ViewSpec):
    from nvidia.dali import fn, types
    thr = 255.0 * v.solarize_threshold  # same uint8 pixels as torchvision's solarize(img, 255 * thr)
    return fn.lookup_table(img, keys=list(range(256)), values=[255 - x if x >= thr else x for x in range(256)],
                           dtype=types.UINT8)


def _decoder_args(mixed: bool) -> dict:
    # EXIF orientation ignored, as PIL's open/convert in the torchvision twin (and torchvision's ImageFolder,
    # which the reference recipes train with): both back ends see the same pixels
    if not mixed:
        return {"device": "cpu", "adjust_orientation": False}
    # nvJPEG scratch buffers sized up front (NVIDIA's ImageNet examples): no regrowth mid-epoch
    return {"device": "mixed", "adjust_orientation": False, "device_memory_padding": 211_025_920,
            "host_memory_padding": 140_544_512}


def _view(encoded, decoded, v: ViewSpec, mixed: bool, out_dtype, layout: str):
    """One augmented view from the encoded bytes (fused ROI decode) or a shared decoded image."""
    from nvidia.dali import fn, types
    crop = dict(random_area=list(v.scale), random_aspect_ratio=list(v.ratio), num_attempts=10)
    if decoded is None:
        img = fn.decoders.image_random_crop(encoded, output_type=types.RGB, **_decoder_args(mixed), **crop)
        img = fn.resize(img, resize_x=v.size, resize_y=v.size, interp_type=types.INTERP_LINEAR, antialias=True)
    else:
        img = fn.random_resized_crop(decoded, size=[v.size, v.size], interp_type=types.INTERP_LINEAR,
                                     antialias=True, **crop)
    has_jitter = any(s > 0 for s in (v.brightness, v.contrast, v.saturation, v.hue))
    if has_jitter:
        img = _maybe(v.jitter_p, _jitter, img, v)
    img = _maybe(v.grayscale_p, _gray, img)
    img = _maybe(v.blur_p, _blur, img, v)
    img = _maybe(v.solarize_p, _solarize, img, v)
    mirror = 0 if v.flip_p <= 0 else (1 if v.flip_p >= 1 else fn.random.coin_flip(probability=v.flip_p))
    return fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout=layout, mirror=mirror,
                                    mean=[255.0 * m for m in v.mean], std=[255.0 * s for s in v.std])


def build_pipeline(spec: AugmentSpec, batch_size: int, source, *, device_id: int | None = None,
                   num_threads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                   channels_last: bool = False, decode: str = "auto", prefetch_queue_depth: int = 2,
                   checkpoint: bytes | None = None, reader=None):
    """The DALI pipeline for ``spec``: outputs ``(*views, labels, indices)``, or ``(*views, *extras)`` with
    ``reader``.

    Args:
        source: batch callable for ``fn.external_source``, returning
            ``(file names as uint8 arrays, labels int64 (B,), indices int64 (B,))``; raises
            ``StopIteration`` at the end of the epoch. Unused with ``reader``.
        reader: instead of ``source``, a function called inside the graph that returns
            ``(encoded images, *extras)`` DALI nodes (a DALI reader: ``DaliShardLoader``).
        device_id: CUDA device (mixed decode + GPU ops) or ``None`` (CPU twin).
        decode: ``"fused"`` = one ROI decode per view (``decoders.image_random_crop``), ``"once"`` =
            one full decode shared by all views, ``"auto"`` = fused on the GPU for <= 2 views, else
            once (a CPU ROI decode still entropy-decodes every row above the crop: on 2 cores,
            MoCo two-view ran ~1.6x faster decoding once).
        checkpoint: a ``Pipeline.checkpoint()`` of a pipeline built with the same arguments: the random
            operators continue from its state (DALI checkpointing is always enabled; it costs nothing per
            batch, only when a checkpoint is taken).
    """
    from nvidia.dali import fn, pipeline_def, types
    if decode not in ("auto", "fused", "once"):
        raise ValueError(f"decode must be 'auto', 'fused' or 'once', got {decode!r}")
    views = spec.expanded()
    if decode == "auto":
        decode = "fused" if device_id is not None and len(views) <= 2 else "once"
    mixed = device_id is not None
    out_dtype = _dtype(dtype)
    layout = "HWC" if channels_last else "CHW"

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def pipe():
        if reader is None:
            names, *extras = fn.external_source(source=source, batch=True, num_outputs=3,
                                                dtype=[types.UINT8, types.INT64, types.INT64])
            encoded = fn.io.file.read(names)
        else:
            encoded, *extras = reader()
        decoded = None
        if decode == "once":
            decoded = fn.decoders.image(encoded, output_type=types.RGB, **_decoder_args(mixed))
        outs = [_view(encoded, decoded, v, mixed, out_dtype, layout) for v in views]
        return (*outs, *extras)

    return pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                prefetch_queue_depth=prefetch_queue_depth, checkpoint=checkpoint)


# ============ the loader ============

def _to_torch(tl, device: torch.device, stream=None) -> torch.Tensor:
    """Copy a dense DALI TensorList into a fresh torch tensor (DALI reuses its buffers).

    GPU outputs are copied on ``stream`` (a side stream: the caller synchronises it, which waits for
    the copies only, not for the training kernels queued on the current stream).
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    t = tl.as_tensor()
    if device.type != "cuda" or stream is None:
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=None)
        return out
    # Allocated on the side stream, so the caching allocator never hands it a block that kernels still
    # queued on the current stream read; record_stream keeps it from being reused before the training
    # kernels that consume it on the current stream have run.
    with torch.cuda.stream(stream):
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    out.record_stream(torch.cuda.current_stream(device))
    feed_ndarray(t, out, cuda_stream=stream)
    return out


class DaliLoader(EpochPosition):
    """DALI multi-view loader with the engine's loader protocol (same as ``TorchLoader``).

    Yields ``(views, labels, indices)``: ``views`` is a list of ``(B, 3, size, size)`` tensors in
    ``spec.expanded()`` order on ``device`` (``channels_last`` memory format if asked); ``labels`` and
    ``indices`` are int64 CPU tensors of shape ``(B,)``.

    Args:
        root: ImageFolder split directory (``root/<class>/*.jpg``), or an ``ImageFileDataset`` whose files and
            labels to read (``fastcl.data.unlabeled.UnlabeledImageDataset``: a folder at any depth, a file list).
        spec: the augmentation spec.
        batch_size: per-rank batch size.
        rank, world_size, seed, drop_last: sharding, as ``TorchLoader`` (``shard_batches``).
        num_threads: DALI CPU threads (the counterpart of ``num_workers``).
        device: ``"cuda"``/``torch.device`` (GPU pipeline on that device), ``"cpu"`` (CPU twin), or
            ``None`` = the current CUDA device if available, else CPU.
        dtype: float32, float16 (produced by DALI) or bfloat16 (fp32 from DALI, cast by torch).
        channels_last: DALI emits NHWC, returned as an NCHW tensor in ``torch.channels_last`` format.
        decode: see ``build_pipeline``.
        validate: ``"header"`` (pre-scan, see module docstring) or ``"none"``.

    Raises:
        ValueError: bad ``batch_size``/``rank``/``dtype``/``validate``; from the ImageFolder scan:
            no class folders or an empty class.
    """

    def __init__(self, root, spec: AugmentSpec, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_threads: int = 2, device=None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool = True, decode: str = "auto",
                 validate: str = "header", prefetch_queue_depth: int = 2):
        from .imagefolder import ImageFileDataset, ImageFolderDataset
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if validate not in ("header", "none"):
            raise ValueError(f"validate must be 'header' or 'none', got {validate!r}")
        _dtype(dtype)  # validate early
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")

        ds = root if isinstance(root, ImageFileDataset) else ImageFolderDataset(root)
        self.root, self.classes = ds.root, ds.classes
        self.paths = [p for p, _ in ds.samples]
        self.skipped_files = ds.skipped_files  # (not image files: left out by the scan)
        self.targets = np.asarray(ds.targets, dtype=np.int64)
        self.spec, self.batch_size = spec, batch_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_threads, self.dtype, self.channels_last = num_threads, dtype, channels_last
        self.decode, self.prefetch_queue_depth = decode, prefetch_queue_depth
        self.epoch, self.start_batch = 0, 0
        self.bad_files: dict[str, str] = {}  # path -> reason
        self._bad: set[int] = set()
        self.num_bad_loads = 0  # substituted samples fed so far
        if validate == "header":
            for i, reason in _prescan(self.paths).items():
                self._flag(i, reason, warn=False)
            if self._bad:
                shown = ", ".join(f"{self.paths[i]} ({self.bad_files[self.paths[i]]})" for i in sorted(self._bad)[:3])
                warnings.warn(f"DaliLoader({str(self.root)!r}): pre-scan flagged {len(self._bad)} undecodable "
                              f"file(s), substituted by the next good sample: {shown}", RuntimeWarning, stacklevel=2)
        if len(self._bad) == len(self.paths):
            raise ValueError(f"DaliLoader({str(self.root)!r}): no decodable image")
        self._pipe = None
        self._plan: list[np.ndarray] = []
        self._cursor = 0
        self._clean = False  # pipeline sits at an epoch boundary and can be reset instead of rebuilt
        self._pipe_count = 0
        self._restore: bytes | None = None  # a DALI checkpoint the next pipeline starts from (load_state_dict)
        self._gen = 0  # iteration counter (see __iter__)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---- protocol ----
    def __len__(self) -> int:
        """Batches per epoch on this rank (not reduced by ``start_batch``)."""
        n, ws, bs = len(self.paths), self.world_size, self.batch_size
        if self.drop_last:
            return n // (ws * bs)
        return -(-len(range(self.rank, n, ws)) // bs)

    def epoch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's index batches for ``epoch`` (default: the current one), ignoring ``start_batch``."""
        return shard_batches(len(self.paths), self.batch_size, rank=self.rank, world_size=self.world_size,
                             seed=self.seed, epoch=self.epoch if epoch is None else epoch, drop_last=self.drop_last)

    @property
    def num_bad_files(self) -> int:
        return len(self._bad)

    def bad_file_report(self) -> dict:
        """``{"bad_files": sorted undecodable paths, "skipped_files": non-image paths left out by the scan}``."""
        return {"bad_files": sorted(self.bad_files), "skipped_files": list(self.skipped_files)}

    # ---- resume ----
    def state_dict(self) -> dict:
        """The augmentation's random state right after the last batch handed out: DALI's checkpoint of the live
        pipeline (its random operators' states; batches it prefetched past that point are not counted), or the
        state this loader was given and has not started from yet, or ``None`` (no pipeline yet: the next one
        starts fresh from ``seed``, rank and the rebuild count, which the state also carries). Taken at the
        engine's checkpoints only (``Pipeline.checkpoint()`` is not free)."""
        pipeline = self._pipe.checkpoint() if self._pipe is not None else self._restore
        return {"backend": "dali", "pipeline": pipeline, "pipe_count": self._pipe_count,
                "batch_size": self.batch_size, "device": self.device.type}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue the augmentation's random stream of ``state`` (from ``state_dict``): with ``set_epoch(e, k)``
        at the saved position the loader yields bit-exactly the views the saved one would have yielded next.
        A state of another back end, batch size or device type (or none) is refused with a warning: the stream
        then restarts (same samples, other views)."""
        why = None
        if not state or state.get("backend") != "dali":
            why = "the checkpoint holds no DALI state (written by another data back end or an older fastcl)"
        elif (state["batch_size"], state["device"]) != (self.batch_size, self.device.type):
            why = (f"its DALI state is for batch {state['batch_size']} on {state['device']}, this loader has batch "
                   f"{self.batch_size} on {self.device.type}")
        if why:
            warnings.warn(f"DaliLoader: {why}; the augmentation's random stream restarts (the same samples in the "
                          "same order, other views)", RuntimeWarning, stacklevel=2)
            return
        self._discard_pipe(keep_state=False)
        self._restore, self._pipe_count = state["pipeline"], int(state["pipe_count"])

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        plan = self.epoch_indices()[self.start_batch:]
        self.start_batch = 0
        self._gen += 1
        gen = self._gen  # a newer iteration supersedes this one (its pipeline and plan)
        pipe = self._fresh_pipe()
        self._plan, self._cursor = plan, 0
        n_views = self.spec.num_views
        done = 0
        try:
            while done < len(plan):
                if self._gen != gen:
                    raise RuntimeError("DaliLoader: this iterator was superseded by a newer iter(loader)")
                try:
                    outs = pipe.run()
                except StopIteration:  # cannot happen before the plan is exhausted; never loop forever
                    raise RuntimeError(f"DALI pipeline ended after {done} of {len(plan)} batches") from None
                except RuntimeError as err:
                    self._recover(plan[done:self._cursor] or plan[done:done + 1], err)
                    self._discard_pipe(keep_state=False)  # (a failed pipeline's state is not trusted)
                    pipe = self._fresh_pipe()
                    self._plan, self._cursor = plan, done
                    continue
                views = [self._convert(outs[k]) for k in range(n_views)]
                if self._copy_stream is not None:
                    self._copy_stream.synchronize()  # DALI may recycle its buffers after this point
                labels = _to_torch(outs[n_views], torch.device("cpu"))
                indices = _to_torch(outs[n_views + 1], torch.device("cpu"))
                done += 1
                if done == len(plan):
                    # Reset now, before the last yield (the batch is already copied out): the Trainer takes
                    # exactly len(loader) batches and never asks for the end, and a pipeline left mid-epoch
                    # would be rebuilt (nvJPEG buffers and all) every epoch.
                    self._end_epoch(pipe)
                yield views, labels, indices
            if not plan:  # (resumed at the epoch's end)
                self._end_epoch(pipe)
        finally:
            if self._gen == gen and (done < len(plan) or not self._clean):
                self._discard_pipe()  # abandoned mid-epoch: batches in flight -> rebuild (same stream) next time

    # ---- internals ----
    def _end_epoch(self, pipe) -> None:
        try:  # the source raises StopIteration right after the last batch: reach it, then reset
            pipe.run()
            raise RuntimeError("DALI pipeline produced a batch past the end of the epoch")
        except StopIteration:
            pipe.reset()
            self._clean = True

    def _convert(self, tl) -> torch.Tensor:
        x = _to_torch(tl, self.device, self._copy_stream)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # NHWC storage = NCHW in channels_last format, no copy
        if self.dtype == torch.bfloat16:
            # on the side stream too: it must follow the copy, and the caller's sync then covers it
            with torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext():
                x = x.to(torch.bfloat16)  # keeps the channels_last strides (preserve_format)
            if self._copy_stream is not None:
                x.record_stream(torch.cuda.current_stream(self.device))
        return x

    def _source(self, _info=None):
        """Batch callable for ``external_source``: file names, labels, indices of the next planned batch."""
        if self._cursor >= len(self._plan):
            raise StopIteration
        idx = self._plan[self._cursor]
        self._cursor += 1
        files, labels = [], np.empty(len(idx), np.int64)
        for k, i in enumerate(idx):
            j = self._substitute(int(i))
            files.append(np.frombuffer(self.paths[j].encode(), dtype=np.uint8))
            labels[k] = self.targets[j]
        return files, labels, np.ascontiguousarray(idx, dtype=np.int64)  # DALI rejects strided arrays

    def _substitute(self, i: int) -> int:
        """``i`` itself, or the next good sample in dataset order when ``i`` is flagged."""
        if i not in self._bad:
            return i
        self.num_bad_loads += 1
        n = len(self.paths)
        for k in range(1, n):
            if (i + k) % n not in self._bad:
                return (i + k) % n
        raise RuntimeError("no decodable image left")  # unreachable: checked at construction

    def _flag(self, i: int, reason: str, warn: bool = True) -> None:
        self._bad.add(i)
        self.bad_files[self.paths[i]] = reason
        if warn:
            warnings.warn(f"DaliLoader: cannot decode {self.paths[i]!r} ({reason}); substituting the next good "
                          f"sample ({len(self._bad)} bad file(s) so far)", RuntimeWarning, stacklevel=3)
        if len(self._bad) == len(self.paths):  # (a user's data: one error line, exit 1, via cli.main_guard)
            shown = ", ".join(f"{p} ({r})" for p, r in list(self.bad_files.items())[:2])
            raise ValueError(f"--data {self.root}: none of its {len(self.paths)} image file(s) can be decoded, "
                             f"e.g. {shown}")

    def _fresh_pipe(self):
        if self._pipe is not None and self._clean:
            self._clean = False
            return self._pipe
        self._discard_pipe()
        restore, self._restore = self._restore, None
        if restore is None:  # (a restored pipeline continues the one that was counted when it was built)
            self._pipe_count += 1
        # distinct augmentation streams per rank and per rebuild; the shuffle never depends on this
        seed = (self.seed * 1_000_003 + self.rank * 7_919 + self._pipe_count - 1) % (2 ** 31)
        try:
            self._pipe = self._build(seed, restore)
        except RuntimeError as err:
            if restore is None:
                raise
            warnings.warn(f"DaliLoader: the saved DALI state does not fit this pipeline ({_error_cause(err)}); the "
                          "augmentation's random stream restarts", RuntimeWarning, stacklevel=3)
            self._pipe = self._build(seed, None)
        return self._pipe

    def _build(self, seed: int, checkpoint: bytes | None):
        pipe = build_pipeline(self.spec, self.batch_size, self._source,
                              device_id=self.device.index if self.device.type == "cuda" else None,
                              num_threads=self.num_threads, seed=seed, dtype=self.dtype,
                              channels_last=self.channels_last, decode=self.decode,
                              prefetch_queue_depth=self.prefetch_queue_depth, checkpoint=checkpoint)
        pipe.build()
        return pipe

    def _discard_pipe(self, keep_state: bool = True):
        """Drop the pipeline; ``keep_state``: its successor continues its random stream from the last batch handed
        out (an abandoned iteration, batches in flight, does not change the views that follow)."""
        if keep_state and self._pipe is not None and self._restore is None:
            try:
                self._restore = self._pipe.checkpoint()
            except RuntimeError:  # (a pipeline that failed: its successor starts a new stream)
                pass
        self._pipe, self._clean = None, False

    def _recover(self, batches: list[np.ndarray], err: BaseException) -> None:
        """A batch failed inside DALI: find the undecodable files among the in-flight batches."""
        cand = sorted({self._substitute_quiet(int(i)) for b in batches for i in b})
        bad = _find_undecodable([self.paths[j] for j in cand], self.device, self.batch_size)
        if not bad:  # every file decodes alone: not a data problem, do not mask it
            raise err
        for k in bad:
            self._flag(cand[k], f"DALI decode error: {_error_cause(err)}")

    def _substitute_quiet(self, i: int) -> int:
        count = self.num_bad_loads
        j = self._substitute(i)
        self.num_bad_loads = count
        return j


_SOURCE_INFO = re.compile(r"(.*?):(\d+):(.*)", re.S)  # fn.readers.webdataset's "<tar path>:<offset>:<name>"


class DaliShardLoader(EpochPosition):
    """Tar shards (WebDataset layout, ``fastcl.data.shards``) read by DALI's ``fn.readers.webdataset``, augmented
    by the graph of ``build_pipeline``; the engine's loader protocol, yielding ``(views, labels, indices)`` as
    ``DaliLoader`` (``indices``: positions in the listed shards' order, as ``ShardLoader``; labels from ``KEY.cls``,
    else -1).

    Epochs. One pipeline per epoch, its reader built with ``num_shards=world_size, shard_id=rank``,
    ``shuffle_after_epoch`` (the tar files in an order drawn from ``seed + epoch``, the same on every rank),
    ``pad_last_batch`` and ``random_shuffle`` (a buffer of ``shuffle_buffer`` samples, seeded per rank and epoch):
    rank ``r`` reads the ``r``-th contiguous part of that order (DALI's shards: ``floor(N / world_size)`` or one
    more samples), never past its end. Each rank takes the first ``len(self) = N // (world_size * batch_size)``
    batches of its part and the pipeline is dropped: every kept sample exactly once per epoch across ranks, the
    same number of full batches on every rank; the rest of each part (fewer than ``batch_size + 1`` samples per
    rank) is skipped that epoch. DALI pads a part past its end by repeating its last sample; those come after the
    part's samples and are never taken. An epoch is a function of ``(seed, epoch, rank, world_size, batch_size)``
    only: ``set_epoch(e)`` on a fresh loader yields the samples and the views of epoch ``e`` of any other.

    Mid-epoch resume (``set_epoch(e, k)``): from ``load_state_dict(state)`` -- DALI's checkpoint of the epoch's
    pipeline (reader position and shuffle buffer, random operators) after the last batch handed out -- when the
    state is at batch ``k`` of epoch ``e`` (what the engine saves): bit-exact and immediate. Without one, the
    epoch's pipeline is run through its first ``k`` batches: bit-exact too, at the cost of decoding them (a warning
    says so).

    Bad input: DALI cannot skip a sample inside a batch and the reader picks the samples, so an undecodable sample
    stops the run with one ``ValueError`` naming the shards (one ``error:`` line from the CLI);
    ``--data-backend torch`` (``ShardLoader``) substitutes and reports such samples instead.
    """

    def __init__(self, source: str, spec: AugmentSpec, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_threads: int = 2, device=None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, decode: str = "auto", shuffle_buffer: int = 1024,
                 prefetch_queue_depth: int = 2, index_cache: str | None = None):
        from .shards import ShardIndex, dali_index_files
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        _dtype(dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.source, self.index = source, ShardIndex(source)
        self._prescan(rank == 0)
        self.index_paths = dali_index_files(self.index, index_cache, self._reader_rows)
        self._read = [s for s, rows in enumerate(self._reader_rows) if rows != []]  # shards the reader reads
        self._num_read = int(sum(self.index.sizes[s] for s in self._read))
        self.spec, self.batch_size = spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.dtype, self.channels_last = num_threads, dtype, channels_last
        self.decode, self.prefetch_queue_depth, self.shuffle_buffer = decode, prefetch_queue_depth, shuffle_buffer
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"the training set has {len(self.index)} samples, fewer than one global batch "
                             f"({world_size} process(es) x {batch_size}): lower --batch-size")
        self._pipe = None
        self._pos = (0, 0)  # (epoch, batches handed out) of self._pipe
        self._restore: dict | None = None
        self._gen = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        return self._num_read // (self.world_size * self.batch_size)

    def _prescan(self, warn: bool) -> None:
        """Header check of every sample (``check_member_header``: its first 16 and last 4 KiB bytes at the offset
        the index records, no decode) and the reader's index rows: a flagged sample's line points at the next good
        sample of its shard, keeping its own member name (DALI reports it in ``source_info``), so its slot gets that
        sample's pixels and label and its own index; a shard without a good sample is not read (``None``: the
        shard's own rows, ``[]``: not read)."""
        self.bad_files: dict[str, str] = {}  # "shard.tar:KEY" -> reason
        self._reader_rows: list[list[tuple] | None] = []
        # source_info of a sample = "<tar path>:<data offset>:<name in the index>" -> (index, label)
        self._lookup: dict[tuple[str, int, str], tuple[int, int]] = {}
        for s, (path, rows) in enumerate(zip(self.index.paths, self.index.shards)):
            with open(path, "rb") as f:
                bad = {r: why for r, row in enumerate(rows) if (why := check_member_header(f, row[1], row[2]))}
            for r, why in bad.items():
                name = f"{path}:{rows[r][0]}"
                self.bad_files[name] = why
                if warn:
                    warnings.warn(f"DaliShardLoader: cannot decode {name} ({why}); substituting the next good sample "
                                  "of its shard", RuntimeWarning, stacklevel=3)
            if len(bad) == len(rows):
                self._reader_rows.append([])
                continue
            start, out = int(self.index.starts[s]), []
            for r, row in enumerate(rows):
                sub = row
                if r in bad:
                    sub = rows[next((r + k) % len(rows) for k in range(1, len(rows)) if (r + k) % len(rows) not in bad)]
                    row = (row[0], sub[1], sub[2], sub[3], row[4])
                out.append(row)
                self._lookup[(path, row[1], re.sub(r"\s", "_", row[4]))] = (start + r, -1 if sub[3] is None else sub[3])
            self._reader_rows.append(out if bad else None)
        if all(rows == [] for rows in self._reader_rows):
            raise ValueError(f"--data {self.source}: no decodable image in the shards ({len(self.bad_files)} "
                             "undecodable sample(s))")

    @property
    def num_bad_files(self) -> int:
        return len(self.bad_files)

    def bad_file_report(self) -> dict:
        """``{"bad_files": sorted "shard.tar:KEY" of the undecodable samples, "skipped_files": []}``."""
        return {"bad_files": sorted(self.bad_files), "skipped_files": []}

    # ---- resume ----
    def state_dict(self) -> dict:
        """The position ``(epoch, batches handed out)`` and DALI's checkpoint of the epoch's pipeline there
        (``None`` at an epoch's end or before the first batch: the next epoch needs no state)."""
        epoch, batch = self._pos
        pipeline = None
        if self._pipe is not None and 0 < batch < len(self):
            pipeline = self._pipe.checkpoint()
        elif self._restore is not None:
            return dict(self._restore)
        return {"backend": "dali-shards", "epoch": epoch, "batch": batch, "pipeline": pipeline,
                "batch_size": self.batch_size, "world_size": self.world_size, "device": self.device.type}

    def load_state_dict(self, state: dict | None) -> None:
        """Resume from ``state_dict()`` (see the class docstring); another loader's state is ignored with a
        warning (the resumed epoch is then replayed up to its batch, same samples and views)."""
        key = ("batch_size", "world_size", "device")
        if not state or state.get("backend") != "dali-shards" or \
                tuple(state[k] for k in key) != (self.batch_size, self.world_size, self.device.type):
            warnings.warn("DaliShardLoader: the checkpoint holds no DALI state for these shards, batch size, world "
                          "size and device; a resumed epoch is replayed up to its batch (same samples and views, "
                          "decoded again)", RuntimeWarning, stacklevel=2)
            return
        self._discard()
        self._restore = dict(state)

    # ---- iteration ----
    def __iter__(self):
        epoch, k = self.epoch, self.start_batch
        self.start_batch = 0
        self._gen += 1
        gen = self._gen
        pipe = self._epoch_pipe(epoch, k)
        n_views = self.spec.num_views
        for b in range(k, len(self)):
            if self._gen != gen:
                raise RuntimeError("DaliShardLoader: this iterator was superseded by a newer iter(loader)")
            outs = self._run(pipe)
            views = [self._convert(outs[v]) for v in range(n_views)]
            if self._copy_stream is not None:
                self._copy_stream.synchronize()  # DALI may recycle its buffers after this point
            labels, indices = self._labels_indices(outs[n_views])
            self._pos = (epoch, b + 1)
            if b + 1 == len(self):
                self._discard()  # the epoch is done: its pipeline (and the rest of its part) is not needed
            yield views, labels, indices

    def _epoch_pipe(self, epoch: int, k: int):
        if self._pipe is not None and self._pos == (epoch, k):
            return self._pipe  # (an iteration abandoned at batch k, resumed there)
        self._discard()
        restore, self._restore = self._restore, None
        ckpt = restore["pipeline"] if restore and (restore["epoch"], restore["batch"]) == (epoch, k) else None
        self._pipe = self._build(epoch, ckpt)
        if ckpt is None and k:
            warnings.warn(f"DaliShardLoader: no DALI state at batch {k} of epoch {epoch}: running the epoch's "
                          f"first {k} batches again to reach it", RuntimeWarning, stacklevel=3)
            for _ in range(k):
                self._run(self._pipe)
        self._pos = (epoch, k)
        return self._pipe

    def _build(self, epoch: int, checkpoint: bytes | None):
        from nvidia.dali import fn
        from .imagefolder import IMG_EXTENSIONS
        exts = ";".join(e.lstrip(".") for e in IMG_EXTENSIONS)
        shuffle_seed = (self.seed * 1_000_003 + epoch) % (2 ** 31)  # the same on every rank: one order of tars
        seed = (self.seed * 1_000_003 + self.rank * 7_919 + epoch * 104_729 + 1) % (2 ** 31)

        def reader():
            enc = fn.readers.webdataset(
                paths=[self.index.paths[s] for s in self._read], index_paths=[self.index_paths[s] for s in self._read], ext=[exts], case_sensitive_extensions=False,
                missing_component_behavior="skip", num_shards=self.world_size, shard_id=self.rank,
                pad_last_batch=True, shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed,
                random_shuffle=self.shuffle_buffer > 1, initial_fill=max(1, self.shuffle_buffer), name="shards")
            return enc, fn.get_property(enc, key="source_info")

        try:
            pipe = build_pipeline(self.spec, self.batch_size, None, reader=reader,
                                  device_id=self.device.index if self.device.type == "cuda" else None,
                                  num_threads=self.num_threads, seed=seed, dtype=self.dtype,
                                  channels_last=self.channels_last, decode=self.decode,
                                  prefetch_queue_depth=self.prefetch_queue_depth, checkpoint=checkpoint)
            pipe.build()
        except RuntimeError as err:
            if checkpoint is None:
                raise
            warnings.warn(f"DaliShardLoader: the saved DALI state does not fit this pipeline ({_error_cause(err)}); "
                          "replaying the epoch instead", RuntimeWarning, stacklevel=3)
            return self._build(epoch, None)
        return pipe

    def _run(self, pipe):
        try:
            return pipe.run()
        except RuntimeError as err:
            self._discard()
            raise ValueError(f"--data {self.source}: DALI cannot decode a sample of the shards ({_error_cause(err)}); "
                             "its header passed the check; --data-backend torch substitutes undecodable samples and "
                             "lists them") from err

    def _labels_indices(self, info) -> tuple[torch.Tensor, torch.Tensor]:
        idx, lab = np.empty(len(info), np.int64), np.empty(len(info), np.int64)
        for i in range(len(info)):
            path, off, name = _SOURCE_INFO.fullmatch(bytes(np.asarray(info[i])).decode()).groups()
            idx[i], lab[i] = self._lookup[(path, int(off), name)]
        return torch.from_numpy(lab), torch.from_numpy(idx)

    def _convert(self, tl) -> torch.Tensor:
        return DaliLoader._convert(self, tl)

    def _discard(self) -> None:
        self._pipe = None


def _error_cause(err: BaseException) -> str:
    """The informative line of a DALI error (its first line is only 'Critical error in pipeline:'): the one
    after 'encountered:', else one naming a cause, else the last."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln.lower().startswith("encountered"):
            return lines[i + 1][:200]
    for ln in lines:
        if any(w in ln.lower() for w in ("premature", "corrupt", "truncat", "invalid", "unsupported", "failed")):
            return ln[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _find_undecodable(paths: list[str], device: torch.device, max_batch: int) -> list[int]:
    """Positions in ``paths`` that the DALI decoder rejects (batches, bisected on failure)."""
    from nvidia.dali import fn, pipeline_def, types
    mixed = device.type == "cuda"
    feed: list[list[str]] = []

    def source(_info=None):
        if not feed:
            raise StopIteration
        return [np.frombuffer(p.encode(), np.uint8) for p in feed.pop()]

    @pipeline_def(batch_size=max(1, min(max_batch, len(paths))), num_threads=1,
                  device_id=device.index if mixed else None, prefetch_queue_depth=1, exec_dynamic=True)
    def checker():
        enc = fn.io.file.read(fn.external_source(source=source, batch=True, dtype=types.UINT8))
        return fn.decoders.image(enc, device="mixed" if mixed else "cpu", output_type=types.RGB)

    def decodes(group: list[int]) -> bool:
        feed.append([paths[k] for k in group])
        pipe = checker()
        try:
            pipe.build()
            pipe.run()
            return True
        except StopIteration:
            return True
        except RuntimeError:
            return False
        finally:
            del pipe

    bad: list[int] = []
    stack = [list(range(len(paths)))[s:s + max_batch] for s in range(0, len(paths), max(1, max_batch))]
    while stack:
        group = stack.pop()
        feed.clear()
        if decodes(group):
            continue
        if len(group) == 1:
            bad.append(group[0])
        else:
            half = len(group) // 2
            stack += [group[:half], group[half:]]
    return sorted(bad)
