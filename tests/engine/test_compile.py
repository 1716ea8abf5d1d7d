"""``--compile``: every method's forward + loss through torch.compile (inductor, here on the CPU) takes the same 3
training steps as eager, in one graph: no graph break, the fused kernels included (the "triton" backend, which
CUDA runs, is exercised through the interpreter: each kernel is one torch.library op with a fake implementation)."""
import pytest
import torch
import torch.nn as nn

import fastcl.kernels as K
from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.methods.byol import BYOL
from fastcl.methods.cmc import CMC
from fastcl.methods.cpc import CPC
from fastcl.methods.dino import DINO
from fastcl.methods.instdisc import InstDisc
from fastcl.methods.invaspread import InvaSpread
from fastcl.methods.moco import MoCo
from fastcl.methods.mocov3 import MoCoV3
from fastcl.methods.simclr import SimCLR
from fastcl.methods.simsiam import SimSiam
from fastcl.methods.swav import SwAV

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
N_DATA = 16  # dataset size for the memory-bank methods (indices 0..15)


def net(d=16):
    return nn.Sequential(nn.Conv2d(3, d, 3), nn.BatchNorm2d(d), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Pool(nn.Module):
    def __init__(self, c_in, d):
        super().__init__()
        self.fc = nn.Linear(c_in * 4, d)

    def forward(self, x):
        return torch.tanh(self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)))


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
METHODS = {  # name: (builder, crop sizes) -- the 13 methods, tiny
    "instdisc": (lambda: InstDisc(net(), 16, N_DATA, dim=8, K=7), (8,)),
    "invaspread": (lambda: InvaSpread(net(), 16, dim=8), (8, 8)),
    "cmc": (lambda: CMC(Pool(1, 12), Pool(2, 12), 12, N_DATA, MEAN, STD, dim=8, K=8), (8,)),
    "cpc": (lambda: CPC(Pool(3, 6), 6, patch=4, stride=2, hidden=8, n_blocks=2, steps=3), (16,)),
    "mocov1": (lambda: MoCo(net(), 16, dim=8, K=24, m=0.9, T=0.07, mlp=False, bn_splits=2), (8, 8)),
    "mocov2": (lambda: MoCo(net(), 16, dim=8, K=24, m=0.9, bn_splits=2), (8, 8)),
    "mocov3": (lambda: MoCoV3(net(), 16, dim=8, mlp_dim=16, sync_bn=False), (8, 8)),
    "simclr": (lambda: SimCLR(net(), 16, dim=8, hidden_dim=16, sync_bn=False), (8, 8)),
    "simclrv2": (lambda: SimCLR(net(), 16, dim=8, hidden_dim=16, proj_layers=3, sync_bn=False, queue_size=32),
                 (8, 8)),
    "byol": (lambda: BYOL(net(), 16, proj_hidden=16, dim=8, pred_hidden=16), (8, 8)),
    "simsiam": (lambda: SimSiam(net(), 16, dim=16, proj_hidden=16, pred_hidden=8), (8, 8)),
    "swav": (lambda: SwAV(net(), 16, hidden=16, dim=8, n_prototypes=10, queue_length=0,
                          freeze_prototypes_epochs=0), (8, 8, 6)),
    "dino": (lambda: DINO(net(), 16, out_dim=32, hidden_dim=16, bottleneck_dim=8, warmup_teacher_temp_epochs=0),
             (8, 8, 6, 6)),
}


class Views:
    """3 fixed batches of 8 images per crop size, with their dataset indices."""

    def __init__(self, sizes):
        g = torch.Generator().manual_seed(0)
        self.batches = [([torch.rand(8, 3, s, s, generator=g) for s in sizes], torch.randperm(N_DATA, generator=g)[:8])
                        for _ in range(3)]
        self.start = 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        for views, idx in self.batches[self.start:]:
            yield views, torch.zeros(8, dtype=torch.long), idx


def _run(name, compile_mode, tmp_path, *, build=None, dist=CPU, **cfg_kw):
    """Train METHODS[name] (or ``build()``) on its 3 fixed batches; the losses and the final state dict."""
    default_build, sizes = METHODS[name]
    torch.manual_seed(0)
    method = (build or default_build)()
    cfg = TrainConfig(**{**dict(out_dir=str(tmp_path / compile_mode), epochs=1, batch_size=8, lr=0.05,
                                weight_decay=1e-4, log_every=1, resume="none", knn_every=0, amp="none",
                                compile=compile_mode), **cfg_kw})
    losses = []
    torch.manual_seed(1)
    Trainer(method, Views(sizes), cfg, dist, log_fn=losses.append).fit()
    return [r["loss"] for r in losses], method.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_steps_equal_eager_in_one_graph(name, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's random streams (shuffles, drop)
    old = K.get_backend()
    K.set_backend("triton")
    try:
        loss_e, sd_e = _run(name, "none", tmp_path)
        torch._dynamo.reset()
        counters.clear()
        loss_c, sd_c = _run(name, "default", tmp_path)
    finally:
        K.set_backend(old)
        torch._dynamo.reset()
    breaks = dict(counters["graph_break"])
    assert breaks == {}, f"{name}: graph breaks {breaks}"
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # (a recompile when values change)
    assert len(loss_c) == 3 and loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-5)
    for k in sd_e:  # inductor reassociates fp32 sums: compounded over 3 SGD steps
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_indexing_straight_from_randperm(name):
    """torch 2.11's inductor (the GPU image's) rewrites ``x[torch.randperm(n)]`` with its randperm_index pattern and
    fails on it ("Not all inputs to pattern found"), and the whole forward then runs eager ("WON'T CONVERT"): MoCo's
    split-BN shuffle did exactly that, so on that torch --compile did nothing for MoCo. No method's graph may index
    with a randperm output directly (failed before: MoCo v1/v2's shuffle). Checked on dynamo's graph, any torch."""
    from fastcl.methods.base import Step

    build, sizes = METHODS[name]
    torch.manual_seed(0)
    method = build()
    views = [torch.rand(8, 3, s, s) for s in sizes]
    step = Step(0, 0, 1, 1, {k: float(v[0]) for k, v in method.schedules(1, 1).items()},
                indices=torch.arange(8) if method.needs_indices else None)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(method, backend=capture, fullgraph=True)(views, step)
    finally:
        torch._dynamo.reset()
    bad = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.randperm:
                bad += [f"{u.target} <- {node.name}" for u in node.users
                        if getattr(u.target, "__name__", "") in ("getitem", "index_select", "index")]
    assert graphs and not bad, f"{name}: indexing straight from randperm: {bad}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("name", ["mocov2", "dino"])
def test_cuda_graph_steps_equal_eager(name, tmp_path, monkeypatch):
    """``--compile reduce-overhead``: 9 steps over three epochs (warm-up, recording, replays; lr / wd / momentum
    changing every step, DINO's teacher temperature -- read inside the graph -- every epoch) equal eager's, with
    no CUDA-graph skip (a CPU tensor, a mutated input, a dynamic shape would skip it) and no graph break; a replay
    overwriting an output that is still read would raise."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    build = None
    if name == "dino":
        def build():
            return DINO(net(), 16, out_dim=32, hidden_dim=16, bottleneck_dim=8, warmup_teacher_temp_epochs=3)

    def run(mode):
        losses, sd = _run(name, mode, tmp_path, build=build, dist=DistInfo(0, 1, 0, torch.device("cuda")),
                          epochs=3, warmup_epochs=1)
        return losses, {k: v.cpu() for k, v in sd.items()}

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss_e, sd_e = run("none")
        torch._dynamo.reset()
        counters.clear()
        loss_c, sd_c = run("reduce-overhead")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        torch._dynamo.reset()
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs skipped (see the cudagraphs warning above)"
    assert len(loss_c) == 9 and loss_c == pytest.approx(loss_e, rel=1e-3, abs=1e-4)
    for k in sd_e:
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name} {k}: {m}")


def test_step_benchmark_reports_what_compile_did(tmp_path, monkeypatch):
    """bench_train_step records dynamo's counters beside every compiled time (a frame that fails falls back to
    eager with a warning and would time eager as "compiled"): one graph and no break for a method that compiles
    whole, the break counted for one that breaks."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.setenv("FASTCL_BENCH_CPU", "1")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    sys.modules.pop("bench_train_step", None)
    bench = importlib.import_module("bench_train_step")

    class Breaking(BYOL):
        def forward(self, views, step):
            out = super().forward(views, step)
            torch._dynamo.graph_break()
            return {"loss": out["loss"] * 1.0}

    def method(cls):
        return cls(net(), 16, proj_hidden=16, dim=8, pred_hidden=16)

    try:
        for name, cls in (("whole", BYOL), ("broken", Breaking)):
            bench.time_trainer(method(cls), 8, [8, 8], tmp_path, name, compile="default", warmup=1, steps=1)
            torch._dynamo.reset()
    finally:
        sys.modules.pop("bench_train_step", None)
    whole, broken = bench.COMPILE_STATS["whole"], bench.COMPILE_STATS["broken"]
    assert whole == {"graphs": 1, "graph_breaks": 0, "frames_failed": 0, "cudagraph_skips": 0}, whole
    assert broken["graph_breaks"] >= 1 and broken["graphs"] >= 2, broken


def test_compile_option_is_checked(tmp_path):
    def cfg(**kw):
        return TrainConfig(out_dir=str(tmp_path), epochs=1, batch_size=8, resume="none", **kw)

    build, sizes = METHODS["simclr"]
    with pytest.raises(ValueError, match="--compile must be one of"):
        Trainer(build(), Views(sizes), cfg(compile="fast"), CPU)
    with pytest.raises(ValueError, match="reduce-overhead records CUDA graphs"):
        Trainer(build(), Views(sizes), cfg(compile="reduce-overhead"), CPU)
    with pytest.raises(ValueError, match="--zero-stage 1"):
        Trainer(build(), Views(sizes), cfg(compile="default", zero_stage=1, optimizer="sgd"), CPU)
    assert Trainer(build(), Views(sizes), cfg(compile="auto"), CPU).compile_mode == "none"  # CPU: eager


class _SyncSources(torch.utils._python_dispatch.TorchDispatchMode):
    """Records where a step would synchronise with a GPU: a scalar read back (``.item()``, ``float(t)``,
    ``bool(t)``, ``int(t)``, ``.tolist()``: ``_local_scalar_dense``) or a tensor made from host data
    (``torch.tensor(x, device=...)``: ``lift_fresh``), with the fastcl line that asked for it."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", "aten.lift_fresh")):
            import traceback

            where = [f"{f.filename.split('/fastcl/')[-1]}:{f.lineno}" for f in traceback.extract_stack()
                     if "/fastcl/" in f.filename or "/kernels/" in f.filename]
            self.events.append((name, where[-3:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_steady_steps_have_no_host_sync(name, tmp_path):
    """Steps 2-5 of 6 (no log, checkpoint or epoch end among them) read nothing back from the device and build
    no tensor from host data, for every method, through the fused kernels' host code too."""
    build, sizes = METHODS[name]
    torch.manual_seed(0)
    method = build()
    counter = _SyncSources()
    marks = []
    orig = method.after_optimizer_step

    def hook(step):
        orig(step)
        marks.append(len(counter.events))

    method.after_optimizer_step = hook
    loader = Views(sizes)
    loader.batches = loader.batches * 2  # 6 steps
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=1, batch_size=8, lr=0.05, log_every=10**6, ckpt_every=0,
                      resume="none", knn_every=0, amp="none")
    old = K.get_backend()
    K.set_backend("triton")
    try:
        with counter:
            Trainer(method, loader, cfg, CPU).fit()
    finally:
        K.set_backend(old)
    steady = counter.events[marks[0]:marks[4]]
    assert steady == [], f"{name}: host syncs in steady steps: {steady}"
