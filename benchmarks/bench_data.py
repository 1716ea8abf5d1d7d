"""Input-pipeline throughput: DALI (``fastcl.data.dali``) vs the torchvision DataLoader, same spec.

Both back ends read the same ImageNet-like JPEG folder (``make_synthetic_imagefolder``: ~500x375,
quality 90, built from real ImageNet photos) with the same parallelism (DALI ``num_threads`` =
DataLoader ``num_workers`` = ``FASTCL_BENCH_WORKERS``, default 2) and the same augmentation spec:

- ``moco``: MoCo v2 aug+ two 224 views;
- ``dino``: DINO multi-crop, 2 x 224 + 10 x 96.

Each round is one full epoch over the folder (after one warm-up epoch; pipelines and workers are
persistent); img/s counts source images (each yields all its views). The median with 20th/80th
percentiles is printed per back end, then the DALI/torch ratio per spec, and the share of the DALI
pipeline's time that its photometric ops take (``test_dali_geometry_only``: the same pipeline with them
off; on a GPU this is the GPU work to shrink). On CUDA the DALI pipeline
runs on the GPU (mixed decode) and ``test_moco_step_*`` also times a MoCo v2 ResNet-50 training step
fed by the pipeline vs by synthetic tensors (skipped without CUDA).

    pytest benchmarks/bench_data.py -s                       # CPU: DALI CPU twin vs torchvision
    FASTCL_BENCH_IMAGES=2048 FASTCL_BENCH_WORKERS=8 pytest benchmarks/bench_data.py -s

Every measurement is appended to ``$FASTCL_BENCH_CSV`` (default ``<cache>/bench/bench_data.csv``) with
the device, torch/DALI versions and the config.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastcl.data import augment

_CUDA = torch.cuda.is_available()  # a GPU step needs a real batch and enough images to keep DALI fed
WORKERS = int(os.environ.get("FASTCL_BENCH_WORKERS", "8" if _CUDA else "2"))
N_IMAGES = int(os.environ.get("FASTCL_BENCH_IMAGES", "1024" if _CUDA else "128"))
BATCH = int(os.environ.get("FASTCL_BENCH_BATCH", "128" if _CUDA else "32"))
_STEP_MS: dict[str, float] = {}  # feed -> median ms per MoCo step, for the fed/synthetic ratio
ROUNDS = int(os.environ.get("FASTCL_BENCH_ROUNDS", "3"))
QUANTILES = (0.5, 0.2, 0.8)
SPECS = {
    "moco": lambda: augment.mocov2_aug_plus(size=224),
    "dino": lambda: augment.multicrop(global_size=224, local_size=96, n_local=10),
}
RESULTS: dict[tuple[str, str], dict] = {}  # (spec, backend) -> stats, reported by the summary test


def _append_csv(row: dict) -> None:
    """One row per measurement in ``$FASTCL_BENCH_CSV`` (default ``<cache>/bench/bench_data.csv``)."""
    import csv
    import datetime
    import platform
    from fastcl.data.fixtures import cache_root
    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = ""
    path = os.environ.get("FASTCL_BENCH_CSV") or str(cache_root() / "bench" / "bench_data.csv")
    row = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
           "host": platform.node(), "torch": torch.__version__, "dali": dali_version, **row}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


@pytest.fixture(scope="module")
def folder():
    from fastcl.data.fixtures import cache_root, make_synthetic_imagefolder
    n_classes = 4
    try:
        return make_synthetic_imagefolder(cache_root() / "bench" / f"imagenet-synth-{N_IMAGES}",
                                          n_classes=n_classes, per_class=N_IMAGES // n_classes)
    except RuntimeError as err:
        pytest.skip(str(err))


def _dali_loader(root, spec):
    from fastcl.data.dali import DaliLoader
    return DaliLoader(root, spec, BATCH, num_threads=WORKERS)


def _torch_loader(root, spec):
    from fastcl.data.imagefolder import ImageFolderDataset
    from fastcl.data.loader import TorchLoader
    from fastcl.data.transforms import MultiViewTransform
    ds = ImageFolderDataset(root, MultiViewTransform(spec))
    return TorchLoader(ds, BATCH, num_workers=WORKERS, persistent_workers=True,
                       pin_memory=torch.cuda.is_available())


def _epoch(loader, device) -> int:
    n = 0
    for views, _, _ in loader:
        if device.type == "cuda":
            views = [v.to(device, non_blocking=True) for v in views]
        n += len(views[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def _throughput(benchmark, loader, spec, spec_name: str, backend: str) -> None:
    """Time ROUNDS epochs of ``loader``; record, append to the CSV and print the img/s quantiles."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epoch = iter(range(10 ** 6))
    counts, times = [], []

    def run():
        loader.set_epoch(next(epoch))
        t0 = time.perf_counter()
        counts.append(_epoch(loader, device))
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    # own clock, not benchmark.stats (None under --benchmark-disable, which runs each benchmark once)
    times = np.array(times[-ROUNDS:])
    rates = counts[-1] / times
    stats = {q: float(np.quantile(rates, q)) for q in QUANTILES}
    stats.update(images=counts[-1], views=spec.num_views, workers=WORKERS, device=str(device))
    RESULTS[(spec_name, backend)] = stats
    benchmark.extra_info.update({f"img_per_s_p{int(q * 100)}": v for q, v in stats.items() if isinstance(q, float)})
    benchmark.extra_info.update(backend=backend, spec=spec_name, workers=WORKERS, device=str(device))
    _append_csv(dict(bench="pipeline", spec=spec_name, backend=backend, views=spec.num_views, workers=WORKERS,
                     batch=BATCH, images=counts[-1], img_per_s_p50=stats[0.5], img_per_s_p20=stats[0.2],
                     img_per_s_p80=stats[0.8]))
    print(f"\n[{spec_name:4s} {backend:5s}] {stats[0.5]:8.1f} img/s (p20 {stats[0.2]:.1f}, p80 {stats[0.8]:.1f}) "
          f"{spec.num_views} views, {WORKERS} threads/workers, {device}")


def _dali_or_skip():
    from fastcl.data.dali import dali_available
    if not dali_available():
        pytest.skip("nvidia-dali not installed")


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_pipeline_throughput(benchmark, folder, spec_name, backend):
    if backend == "dali":
        _dali_or_skip()
    spec = SPECS[spec_name]()
    loader = (_dali_loader if backend == "dali" else _torch_loader)(folder, spec)
    _throughput(benchmark, loader, spec, spec_name, backend)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_dali_geometry_only(benchmark, folder, spec_name):
    """The DALI pipeline with its photometric ops off (decode, crop, resize, flip, normalize): the difference to
    the full pipeline's rate is what colour jitter, grayscale, blur and solarize cost (printed by the summary)."""
    _dali_or_skip()
    spec = SPECS[spec_name]()
    off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    spec = augment.AugmentSpec(tuple(replace(v, **off) for v in spec.views), spec.counts)
    _throughput(benchmark, _dali_loader(folder, spec), spec, spec_name, "dali-geometry")


def test_summary_ratio():
    """Print DALI / torch img/s per spec (needs the throughput tests above in the same run)."""
    if not RESULTS:
        pytest.skip("no throughput results in this run")
    for name in SPECS:
        d, t = RESULTS.get((name, "dali")), RESULTS.get((name, "torch"))
        if d and t:
            print(f"\n[{name}] DALI {d[0.5]:.1f} img/s vs torchvision {t[0.5]:.1f} img/s: "
                  f"ratio {d[0.5] / t[0.5]:.2f}x ({d['device']}, {WORKERS} threads/workers)")
        g = RESULTS.get((name, "dali-geometry"))
        if d and g:  # per-image time: 1/d in all, 1/g without the photometric ops
            print(f"[{name}] DALI photometric ops (jitter, grayscale, blur, solarize): {1 - d[0.5] / g[0.5]:.0%} of "
                  f"the pipeline's time per image ({g[0.5]:.1f} img/s without them, {d['device']})")


# ============ GPU: MoCo v2 R50 step, pipeline-fed vs synthetic ============

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: times a ResNet-50 training step on the GPU")
@pytest.mark.parametrize("feed", ["synthetic", "dali"])
def test_moco_step(benchmark, folder, feed):
    from fastcl.methods.base import Step
    from fastcl.methods.moco import MoCo
    from fastcl.models import build_backbone
    device = torch.device("cuda")
    net, dim = build_backbone("resnet50")
    method = MoCo(net, dim, K=65536, T=0.2).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    spec = SPECS["moco"]()
    if feed == "dali":
        from fastcl.data.dali import DaliLoader
        loader = DaliLoader(folder, spec, BATCH, num_threads=WORKERS, device=device, channels_last=True)
        if len(loader) == 0:
            pytest.skip("folder smaller than one batch")

        def batches():
            epoch = 0
            while True:
                loader.set_epoch(epoch)
                for views, _, _ in loader:
                    yield views
                epoch += 1
        source = batches()
    else:
        fixed = [torch.randn(BATCH, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
                 for _ in range(2)]
        source = iter(lambda: fixed, None)
    steps = 0

    def step():
        nonlocal steps
        views = next(source)
        s = Step(step=steps, epoch=0, steps_per_epoch=1, total_steps=10 ** 6, values={"momentum": 0.999})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method(views, s)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.before_optimizer_step(s)
        opt.step()
        method.after_optimizer_step(s)
        steps += 1

    for _ in range(5):  # burn-in: cudnn autotune, allocator, DALI prefetch
        step()
    torch.cuda.synchronize()

    step_times = []

    def timed(n=20):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        step_times.append((time.perf_counter() - t0) / n)

    benchmark.pedantic(timed, rounds=3, iterations=1)
    per_step = float(np.median(step_times))
    benchmark.extra_info.update(feed=feed, img_per_s=BATCH / per_step, gpu=torch.cuda.get_device_name())
    _append_csv(dict(bench="moco_r50_step", spec="moco", backend=feed, views=2, workers=WORKERS, batch=BATCH,
                     images=BATCH * 20, img_per_s_p50=BATCH / per_step, img_per_s_p20="", img_per_s_p80=""))
    _STEP_MS[feed] = per_step * 1e3
    ratio = ""
    if len(_STEP_MS) == 2:  # 1.00x: the pipeline keeps up with the GPU; more: the step waits for data
        ratio = f"; pipeline-fed / synthetic = {_STEP_MS['dali'] / _STEP_MS['synthetic']:.2f}x step time"
    print(f"\n[moco v2 R50 step, {feed}] {per_step * 1e3:.1f} ms/step, {BATCH / per_step:.0f} img/s "
          f"({torch.cuda.get_device_name()}, batch {BATCH}){ratio}")
