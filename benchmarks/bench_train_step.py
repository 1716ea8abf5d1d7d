"""Training steps, whole: MoCo v2 (hand-written loop vs fastcl with torch / fused kernels / compiled),
MoCo v2 on CIFAR (split BN vs plain BN) and DINO ViT-S/16 and ViT-S/8 multi-crop, and the 200-epoch budget.

    pytest benchmarks/bench_train_step.py -s          # GPU: synthetic on-device data, bf16, channels_last
    FASTCL_BENCH_CPU=1 pytest benchmarks/bench_train_step.py -s   # CPU smoke: the MoCo test on ResNet-18-CIFAR, batch 32

Every fastcl variant runs the real ``Trainer`` (schedules, optimizer, EMA, queue, non-finite bookkeeping) on a
synthetic loader; a step is timed as the mean over ``steps`` steps between two device synchronisations, so
a step that never syncs lets the CPU run ahead as it would in training. "hand" is a plain-PyTorch
transcription of facebookresearch/moco (builder.py + main_moco.py's step: per-parameter momentum loop,
logits materialised, ``int(queue_ptr)``), given the same bf16 autocast and channels_last, as the baseline a
user would write. "compiled" is ``--compile default``: the method's forward and fused loss in one graph;
"cudagraphs" (MoCo v2 R50, last in the file) is ``--compile reduce-overhead``: the same graphs replayed as CUDA graphs.

The projection: one epoch of ImageNet-1k is 1,281,167 images; 200 epochs on G GPUs at S img/s per GPU take
200 * 1281167 / (S * G) seconds. The reference is the MoCo paper's "MoCo v2 ... 200 epochs ... 53 hours in
8 V100 GPUs" (Chen et al. 2020, Table 3 footnote), i.e. 200*1281167/(53*3600)/8 = 168 img/s per V100.
Synthetic on-device input isolates the step from the data pipeline (benchmarks/bench_data.py measures that).
With ``$FASTCL_BENCH_JSON`` set, each test appends its numbers to that JSON-lines file.
"""
from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fastcl import kernels
from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.methods.dino import DINO
from fastcl.methods.moco import MoCo
from fastcl.models import build_backbone

IMAGENET_TRAIN = 1_281_167
REFERENCE_HOURS, REFERENCE_GPUS = 53.0, 8  # MoCo v2, 200 epochs, 8x V100
CPU_SMOKE = os.environ.get("FASTCL_BENCH_CPU") == "1"

if not torch.cuda.is_available() and not CPU_SMOKE:
    pytest.skip("needs CUDA (or FASTCL_BENCH_CPU=1 for a small CPU smoke run)", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ARCH, BATCH, SIZE, K = ("resnet18_cifar", 32, 32, 4096) if CPU_SMOKE else ("resnet50", 256, 224, 65536)
WARMUP, STEPS = (2, 4) if CPU_SMOKE else (10, 30)


def _record(**rec) -> None:
    path = os.environ.get("FASTCL_BENCH_JSON")
    if path:
        dev = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
        with open(path, "a") as f:
            f.write(json.dumps({"device": dev, "torch": torch.__version__, **rec}) + "\n")


class SyntheticLoader:
    """The loader protocol over one fixed on-device batch of ``sizes`` views (no decode, no copy)."""

    def __init__(self, steps: int, batch: int, sizes: list[int]):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.views = [torch.randn(batch, 3, s, s, device=DEVICE, generator=g) for s in sizes]
        self.labels = torch.zeros(batch, dtype=torch.long, device=DEVICE)
        self.steps, self.start = steps, 0

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        for _ in range(self.start, self.steps):
            yield self.views, self.labels, self.labels


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_trainer(method, batch: int, sizes: list[int], tmp_path, name: str, *, optimizer="sgd", lr=0.03,
                 backend="auto", warmup=WARMUP, steps=STEPS, **cfg_kw) -> float:
    """Mean seconds per step of the fastcl Trainer over ``steps`` steps after ``warmup`` (two syncs in all)."""
    kernels.set_backend(backend)
    marks: dict[int, float] = {}
    orig = method.after_optimizer_step

    def timed_after(step):
        orig(step)
        if step.step + 1 in (warmup, warmup + steps):
            _sync()
            marks[step.step + 1] = time.perf_counter()

    method.after_optimizer_step = timed_after
    cfg = TrainConfig(out_dir=str(tmp_path / name), epochs=1, batch_size=batch, optimizer=optimizer, lr=lr,
                      log_every=10**9, resume="none", **cfg_kw)
    trainer = Trainer(method, SyntheticLoader(warmup + steps, batch, sizes), cfg, DistInfo(0, 1, 0, DEVICE))
    trainer.save = lambda *a, **k: None  # checkpoints are not part of the step
    compiled = trainer.compile_mode != "none"  # (the Trainer resolved "auto")
    if compiled:
        counters.clear()
    try:
        trainer.fit()
    finally:
        kernels.set_backend("auto")
    if compiled:
        COMPILE_STATS[name] = compile_stats()
    return (marks[warmup + steps] - marks[warmup]) / steps


COMPILE_STATS: dict[str, dict] = {}  # time_trainer's name -> compile_stats() of its compiled run


def compile_stats() -> dict:
    """What torch.compile did in the timed run, from dynamo's counters: a compiled time is only a compiled time
    if the step really compiled (a failing frame falls back to eager with a warning, and times eager)."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "frames_failed": counters["frames"]["total"] - counters["frames"]["ok"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


# ------------------------------------------------------------------------------------------- MoCo v2
class HandMoCo(nn.Module):
    """facebookresearch/moco builder.py (MoCo v2: MLP head), single device (no shuffle BN), as written there."""

    def __init__(self, arch: str, dim=128, K=65536, m=0.999, T=0.2):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        backbone, feat = build_backbone(arch)
        self.encoder_q = nn.Sequential(backbone, nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def _hand_loop(model, loss_fn, after=None, batch=BATCH, warmup=WARMUP, steps=STEPS) -> float:
    """Mean seconds per step of a plain-PyTorch loop: bf16 autocast + channels_last on CUDA, SGD, the
    official repos' unfused loss and per-parameter momentum loop (``after``)."""
    model = model.to(DEVICE)
    if DEVICE.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.03, momentum=0.9, weight_decay=1e-4)
    x1, x2 = SyntheticLoader(1, batch, [SIZE, SIZE]).views
    if DEVICE.type == "cuda":
        x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        with amp:
            loss = loss_fn(model, x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after is not None:
            after(model)
    _sync()
    return (time.perf_counter() - t0) / steps


def time_hand_moco(warmup=WARMUP, steps=STEPS) -> float:
    torch.manual_seed(0)

    def loss_fn(model, im_q, im_k):  # main_moco.py: criterion(output, target) on the materialised logits
        output, target = model(im_q, im_k)
        return F.cross_entropy(output.float(), target)
    return _hand_loop(HandMoCo(ARCH, K=K), loss_fn, warmup=warmup, steps=steps)


def moco(arch=ARCH, K=K, bn_splits=1) -> MoCo:
    torch.manual_seed(0)
    backbone, feat = build_backbone(arch)
    return MoCo(backbone, feat, K=K, bn_splits=bn_splits)


def _budget_line(name: str, t: float) -> str:
    hours_8 = 200 * IMAGENET_TRAIN / (BATCH / t * 8) / 3600
    hours_1 = hours_8 * 8
    cmp = "not comparable: CPU smoke config" if CPU_SMOKE else f"{REFERENCE_HOURS / hours_8:.1f}x faster"
    return (f"  projected 200-epoch ImageNet ({name}): {hours_1:.1f} h on 1 such device, {hours_8:.1f} h on 8 vs "
            f"the paper's {REFERENCE_HOURS:.0f} h on 8x V100 ({cmp})")


def test_mocov2_step_throughput_and_200_epoch_budget(tmp_path, benchmark):
    """MoCo v2 R50: hand loop, fastcl with torch kernels, with fused kernels (CPU smoke: R18-CIFAR, hand and
    torch kernels only: on a CPU the fused kernels would run in the Triton interpreter)."""
    times = {"hand": time_hand_moco(),
             "torch": time_trainer(moco(bn_splits=8 if CPU_SMOKE else 1), BATCH, [SIZE, SIZE], tmp_path, "t",
                                   backend="torch")}
    if not CPU_SMOKE:  # (on a CPU the Triton kernels run in the interpreter, a correctness tool: ~1 min/step)
        times["fused"] = benchmark.pedantic(
            lambda: time_trainer(moco(), BATCH, [SIZE, SIZE], tmp_path, "f"), rounds=1, iterations=1)
        # the recipe's one-GPU default: split BN over 8 sub-batches stands in for shuffle BN
        times["fused_splitbn8"] = time_trainer(moco(bn_splits=8), BATCH, [SIZE, SIZE], tmp_path, "s")
    dev = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"\nMoCo v2 {ARCH} batch {BATCH} {SIZE}px K={K} on {dev}:")
    for name, t in times.items():
        print(f"  {name:9s} {t * 1e3:8.1f} ms/step {BATCH / t:8.0f} img/s  ratio vs hand {times['hand'] / t:.2f}x")
    ref_img_s = 200 * IMAGENET_TRAIN / (REFERENCE_HOURS * 3600) / REFERENCE_GPUS
    print(f"  (reference: {ref_img_s:.0f} img/s per V100)")
    for name, t in times.items():
        print(_budget_line(name, t))
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in times.items()})
    _record(bench="mocov2_step", arch=ARCH, batch=BATCH, size=SIZE, K=K,
            ms_per_step={k: v * 1e3 for k, v in times.items()},
            img_per_s={k: BATCH / v for k, v in times.items()},
            imagenet_200ep_hours_1gpu={k: 200 * IMAGENET_TRAIN / (BATCH / v) / 3600 for k, v in times.items()})
    assert all(t > 0 for t in times.values())


@pytest.mark.skipif(CPU_SMOKE, reason="GPU sizes")
@pytest.mark.parametrize("bn_splits", [8, 1])
def test_mocov2_cifar_step(tmp_path, benchmark, bn_splits):
    """The CIFAR preset's step (R18-CIFAR, batch 512, 32px, K 4096): split BN 8 (the one-GPU default) vs 1."""
    t = benchmark.pedantic(lambda: time_trainer(moco("resnet18_cifar", 4096, bn_splits), 512, [32, 32],
                                                tmp_path, f"c{bn_splits}", lr=0.06, weight_decay=5e-4),
                           rounds=1, iterations=1)
    print(f"\nMoCo v2 resnet18_cifar batch 512 32px split-BN {bn_splits}: {t * 1e3:.1f} ms/step, {512 / t:.0f} img/s, "
          f"{50000 // 512 * t:.1f} s per CIFAR-10 epoch (synthetic data)")
    benchmark.extra_info.update(ms_per_step=t * 1e3, img_per_s=512 / t)
    _record(bench="mocov2_cifar_step", bn_splits=bn_splits, ms_per_step=t * 1e3, img_per_s=512 / t)


# ------------------------------------------------------------------------------------------- SimCLR, BYOL
def _simclr_hand():
    """SimCLR v1 as its common PyTorch ports write it: R50, 2-layer projector, NT-Xent over a materialised
    2N x 2N similarity matrix with the diagonal masked, cross-entropy."""
    backbone, feat = build_backbone(ARCH)
    model = nn.Sequential(backbone, nn.Linear(feat, feat, bias=False), nn.BatchNorm1d(feat), nn.ReLU(),
                          nn.Linear(feat, 128, bias=False))

    def loss_fn(model, x1, x2, T=0.1):
        z = F.normalize(model(torch.cat([x1, x2])).float(), dim=1)
        n = x1.shape[0]
        sim = (z @ z.t() / T).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)
    return model, loss_fn, None


class _HandBYOL(nn.Module):
    def __init__(self):
        super().__init__()
        backbone, feat = build_backbone(ARCH)
        mlp = lambda i, h, o: nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))  # noqa
        self.online = nn.Sequential(backbone, mlp(feat, 4096, 256))
        self.predictor = mlp(256, 4096, 256)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad = False


def _byol_hand():
    """BYOL as lucidrains/byol-pytorch writes it: symmetric 2 - 2cos, target updated by a per-parameter loop."""
    def loss_fn(model, x1, x2):
        x = torch.cat([x1, x2])
        p = F.normalize(model.predictor(model.online(x)).float(), dim=1)
        with torch.no_grad():
            z = F.normalize(model.target(x).float(), dim=1)
        n = x1.shape[0]
        return (2 - 2 * (p[:n] * z[n:]).sum(1)).mean() + (2 - 2 * (p[n:] * z[:n]).sum(1)).mean()

    @torch.no_grad()
    def ema(model, tau=0.996):
        for po, pt in zip(model.online.parameters(), model.target.parameters()):
            pt.data = pt.data * tau + (1 - tau) * po.data
    return _HandBYOL(), loss_fn, ema


def _fastcl_method(name):
    from fastcl.methods.byol import BYOL
    from fastcl.methods.simclr import SimCLR

    torch.manual_seed(0)
    backbone, feat = build_backbone(ARCH)
    if name == "simclr":
        return SimCLR(backbone, feat, dim=128, sync_bn=False)
    return BYOL(backbone, feat)


@pytest.mark.skipif(CPU_SMOKE, reason="GPU sizes")
@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_simclr_byol_steps(tmp_path, benchmark, name):
    """SimCLR v1 and BYOL, R50 batch 256 224px: hand loop vs fastcl eager vs fastcl --compile default (SGD in
    all three, so the optimizer is not what differs). FASTCL_BENCH_COMPILE=0 skips the compiled variant."""
    torch.manual_seed(0)
    model, loss_fn, after = _simclr_hand() if name == "simclr" else _byol_hand()
    times = {"hand": _hand_loop(model, loss_fn, after)}
    del model
    times["eager"] = benchmark.pedantic(
        lambda: time_trainer(_fastcl_method(name), BATCH, [SIZE, SIZE], tmp_path, f"{name}e"), rounds=1, iterations=1)
    if os.environ.get("FASTCL_BENCH_COMPILE", "1") == "1":
        times["compiled"] = time_trainer(_fastcl_method(name), BATCH, [SIZE, SIZE], tmp_path, f"{name}c",
                                         compile="default")
    print(f"\n{name} {ARCH} batch {BATCH} {SIZE}px: " + ", ".join(
        f"{k} {v * 1e3:.1f} ms/step ({BATCH / v:.0f} img/s, {times['hand'] / v:.2f}x hand)" for k, v in times.items()))
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in times.items()})
    if "compiled" in times:
        print(f"{name} compiled: {COMPILE_STATS.get(name + 'c')}")
    _record(bench=f"{name}_step", arch=ARCH, batch=BATCH, size=SIZE, ms_per_step={k: v * 1e3 for k, v in times.items()},
            img_per_s={k: BATCH / v for k, v in times.items()}, compile_stats=COMPILE_STATS.get(f"{name}c"))


# ------------------------------------------------------------------------------------------- DINO
@pytest.mark.skipif(CPU_SMOKE, reason="GPU sizes")
@pytest.mark.parametrize("patch", [16, 8])
def test_dino_vits_step(tmp_path, benchmark, patch):
    """DINO ViT-S/16 and ViT-S/8, multi-crop 2x224 + 10x96, batch 64 per GPU (the paper's 1024 over 16 GPUs),
    head K=65,536, AdamW, per-parameter clip 3.0, fused kernels."""
    batch = 64
    torch.manual_seed(0)
    arch = f"vit_small_patch{patch}_224"
    student, feat = build_backbone(arch, drop_path_rate=0.1, img_size=224)
    teacher, _ = build_backbone(arch, img_size=224)
    method = DINO(student, feat, teacher_backbone=teacher, out_dim=65536, norm_last_layer=False, clip_grad=3.0)
    kw = dict(optimizer="adamw", lr=5e-4 * batch / 256, weight_decay=0.04, warmup=5, steps=15)
    crops = [224] * 2 + [96] * 10
    t = benchmark.pedantic(lambda: time_trainer(method, batch, crops, tmp_path, f"d{patch}", **kw),
                           rounds=1, iterations=1)
    times = {"eager": t}
    if os.environ.get("FASTCL_BENCH_COMPILE", "1") == "1" and os.environ.get("FASTCL_BENCH_DINO_COMPILE", "1") == "1":
        times["compiled"] = time_trainer(method, batch, crops, tmp_path, f"d{patch}c", compile="default", **kw)
    for name, t in times.items():
        epoch_h = IMAGENET_TRAIN / (batch / t) / 3600
        print(f"\nDINO ViT-S/{patch} 2x224+10x96 batch {batch} {name}: {t * 1e3:.1f} ms/step, {batch / t:.0f} img/s "
              f"(one ImageNet epoch: {epoch_h:.2f} h on one such device)")
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in times.items()})
    if "compiled" in times:
        print(f"DINO ViT-S/{patch} compiled: {COMPILE_STATS.get(f'd{patch}c')}")
    _record(bench="dino_step", arch=arch, batch=batch, ms_per_step={k: v * 1e3 for k, v in times.items()},
            img_per_s={k: batch / v for k, v in times.items()}, compile_stats=COMPILE_STATS.get(f"d{patch}c"),
            imagenet_epoch_hours_1gpu={k: IMAGENET_TRAIN / (batch / v) / 3600 for k, v in times.items()})


# ------------------------------------------------------------------------------------------- compiled (last: slow)
def _mocov2_compiled(tmp_path, benchmark, mode: str, label: str, bench: str) -> None:
    """Time MoCo v2 R50 under ``--compile MODE``; the compilation time is printed apart."""
    t0 = time.perf_counter()
    t = benchmark.pedantic(lambda: time_trainer(moco(), BATCH, [SIZE, SIZE], tmp_path, mode, compile=mode),
                           rounds=1, iterations=1)
    total = time.perf_counter() - t0
    print(f"\nMoCo v2 {ARCH} batch {BATCH} {label} (--compile {mode}): {t * 1e3:.1f} ms/step, {BATCH / t:.0f} img/s "
          f"({total:.0f} s in all with compilation; {COMPILE_STATS.get(mode)})")
    print(_budget_line(label, t))
    benchmark.extra_info.update(ms_per_step=t * 1e3, img_per_s=BATCH / t, total_s=total)
    _record(bench=bench, arch=ARCH, batch=BATCH, size=SIZE, K=K, ms_per_step=t * 1e3,
            img_per_s=BATCH / t, seconds_with_compilation=total, compile_stats=COMPILE_STATS.get(mode),
            imagenet_200ep_hours_1gpu=200 * IMAGENET_TRAIN / (BATCH / t) / 3600)


@pytest.mark.skipif(CPU_SMOKE, reason="GPU sizes")
def test_mocov2_step_compiled(tmp_path, benchmark):
    """MoCo v2 R50 as ``--compile default`` runs it (the method's forward + fused loss in one torch.compile
    graph, hence its backward too), fused kernels. Near the end of the file: on a time-boxed GPU call it is
    one of the ones to lose."""
    _mocov2_compiled(tmp_path, benchmark, "default", "compiled", "mocov2_step_compiled")


@pytest.mark.skipif(CPU_SMOKE, reason="GPU sizes")
@pytest.mark.skipif(os.environ.get("FASTCL_BENCH_COMPILE") == "0", reason="FASTCL_BENCH_COMPILE=0")
def test_mocov2_step_cudagraphs(tmp_path, benchmark):
    """MoCo v2 R50 under ``--compile reduce-overhead``: the compiled graphs replayed as CUDA graphs (host launch
    cost gone; the queue, EMA and optimizer steps stay eager). After the plain compiled step, so the ratio of the
    two is read off one run; the very last in the file."""
    _mocov2_compiled(tmp_path, benchmark, "reduce-overhead", "CUDA graphs", "mocov2_step_cudagraphs")
