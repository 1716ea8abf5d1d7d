"""The engine on its own: split BN, LARS, schedules, exact resume, non-finite loss, DDP == one process."""
import dataclasses
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastcl.engine.distributed import shutdown_distributed
from fastcl.engine import NonFiniteLossError, TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo, init_distributed
from fastcl.engine.optim import LARS, cosine_schedule
from fastcl.methods import Method
from fastcl.models.heads import SplitBatchNorm2d


# ---------------------------------------------------------------------------------------------- pieces


def _split_bn_reference(x, weight, bias, rm, rv, splits, momentum=0.1, eps=1e-5):
    """MoCo's CIFAR demo split BN as written there: batch_norm over x reshaped to (N/S, S*C, H, W)."""
    n, c, h, w = x.shape
    rm_r, rv_r = rm.repeat(splits), rv.repeat(splits)
    out = F.batch_norm(x.reshape(n // splits, c * splits, h, w), rm_r, rv_r, weight.repeat(splits),
                       bias.repeat(splits), True, momentum, eps).reshape(n, c, h, w)
    return out, rm_r.view(splits, c).mean(0), rv_r.view(splits, c).mean(0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_matches_mocos_in_float64_keeps_layout_and_is_cheap(channels_last):
    """Output, input/weight/bias gradients and running stats equal the demo's split BN in float64; a
    channels_last input gives a channels_last output; it costs a BatchNorm-like number of ops on the
    activation (the demo's: reshape copies + 15 ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(16, 6, 5, 7, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt).requires_grad_()
    bn = SplitBatchNorm2d(6, num_splits=4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    w_ref = bn.weight.detach().clone().requires_grad_()
    b_ref = bn.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref, rm, rv = _split_bn_reference(x_ref, w_ref, b_ref, bn.running_mean.clone(), bn.running_var.clone(), 4)

    class Big(TorchDispatchMode):  # ops that read or write an activation-sized tensor (views move no data)
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and any(isinstance(a, torch.Tensor) and a.numel() == x.numel() for a in [*args, out]):
                Big.n += 1
            return out

    with Big():
        out = bn(x)
    assert Big.n <= 3, Big.n  # mean, mean square, one scale-and-shift pass
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bn.weight.grad, w_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bn.bias.grad, b_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, rv, rtol=1e-12, atol=1e-12)

def test_split_bn_equals_per_chunk_bn():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    bn = SplitBatchNorm2d(3, num_splits=4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    ref_rm, ref_rv, chunks = [], [], []
    for c in (x[j::4] for j in range(4)):  # sub-batch j = samples j, j+4, ... (a free reshape, as in MoCo's demo)
        rm, rv = torch.zeros(3), torch.ones(3)
        chunks.append(F.batch_norm(c, rm, rv, bn.weight, bn.bias, training=True, momentum=0.1, eps=bn.eps))
        ref_rm.append(rm)
        ref_rv.append(rv)
    out = bn(x)
    torch.testing.assert_close(out, torch.stack(chunks, 1).flatten(0, 1))
    torch.testing.assert_close(bn.running_mean, torch.stack(ref_rm).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(ref_rv).mean(0))
    bn.eval()  # eval: plain BN with the averaged statistics
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = LARS([{"params": [w], "weight_decay": 1e-2}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, trust_coefficient=0.001)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    mw, mb = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for it in range(3):
        gw, gb = torch.randn_like(w_ref), torch.randn_like(b_ref)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 1e-2 * w_ref
        d = d * (0.001 * w_ref.norm() / d.norm())
        mw = d if it == 0 else 0.9 * mw + d
        mb = gb if it == 0 else 0.9 * mb + gb
        w_ref, b_ref = w_ref - 0.5 * mw, b_ref - 0.5 * mb
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)


def test_cosine_schedule_warmup_and_end_points():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40
    np.testing.assert_allclose(s[:10], np.arange(10) / 10)
    assert s[10] == pytest.approx(1.0)
    t = 15  # inside the cosine: base -> final over the 30 post-warm-up steps
    assert s[10 + t] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t / 30)))
    assert s[-1] == pytest.approx(0.1, abs=0.01)


# ---------------------------------------------------------------------------------------------- toys
class ToyLoader:
    """The loader protocol over a fixed tensor set; interleaved DDP shards; optional RNG 'augmentation'."""

    def __init__(self, n=48, dim=8, batch_size=6, rank=0, world_size=1, noise=True, seed=0):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.bs, self.rank, self.world, self.noise, self.seed = batch_size, rank, world_size, noise, seed
        self.epoch, self.start = 0, 0

    def __len__(self):
        return len(self.x) // (self.bs * self.world)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = perm[self.rank::self.world]
        for i in range(self.start, len(self)):
            idx = mine[i * self.bs:(i + 1) * self.bs]
            x = self.x[idx]
            v2 = x + 0.1 * torch.randn_like(x) if self.noise else x.flip(1)  # draws from the global RNG
            yield [x, v2], torch.zeros(len(idx), dtype=torch.long), idx


class ToyMethod(Method):
    """A linear encoder regressed from one view onto the other, with an EMA copy (like a momentum encoder)."""

    def __init__(self, nan_at_step=None):
        super().__init__()
        torch.manual_seed(7)
        self.backbone = nn.Linear(8, 8)
        self.target = nn.Linear(8, 8)
        self.target.load_state_dict(self.backbone.state_dict())
        self.target.requires_grad_(False)
        self.nan_at_step = nan_at_step

    def schedules(self, epochs, steps_per_epoch):
        return {"momentum": cosine_schedule(0.9, 1.0, epochs, steps_per_epoch)}

    def forward(self, views, step):
        loss = F.mse_loss(self.backbone(views[0]), views[1])
        if step.step == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "target_gap": (self.backbone.weight - self.target.weight).abs().mean().detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step):
        for pt, po in zip(self.target.parameters(), self.backbone.parameters()):
            pt.lerp_(po, 1 - step["momentum"])


CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _train(tmp, max_steps, log, method=None, loader=None, **kw):
    cfg = TrainConfig(out_dir=str(tmp), epochs=3, batch_size=6, optimizer="sgd", lr=0.1, weight_decay=1e-3,
                      warmup_epochs=1, max_steps=max_steps, amp="none", **{"log_every": 1, **kw})
    t = Trainer(method or ToyMethod(), loader or ToyLoader(), cfg, CPU, log_fn=log.append)
    t.fit()
    return t


def test_a_methods_own_lr_schedule_replaces_the_cosine_and_drives_the_optimizer(tmp_path):
    m = ToyMethod()
    m.lr_schedule = lambda epochs, spe: np.where(np.arange(epochs * spe) < spe, 0.5, 0.05)  # a step at epoch 1
    log = []
    t = _train(tmp_path, 10, log, method=m)
    spe = t.steps_per_epoch
    np.testing.assert_array_equal(t.schedules["lr"], np.where(np.arange(3 * spe) < spe, 0.5, 0.05))
    assert "momentum" in t.schedules  # the method's other schedules stay
    assert [r["lr"] for r in log if "lr" in r] == [0.5] * spe + [0.05] * (10 - spe)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    torch.manual_seed(0)
    full = []
    a = _train(tmp_path / "a", 20, full)
    assert len(full) == 20
    torch.manual_seed(0)
    first, second = [], []
    _train(tmp_path / "b", 11, first)  # stops mid-epoch 1 (8 steps/epoch), checkpoint written on the way out
    torch.manual_seed(123)  # a fresh process would not share the RNG state: resume must restore it
    b = _train(tmp_path / "b", 20, second)
    assert [r["step"] for r in second] == list(range(12, 21))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]  # bit-exact
    for pa, pb in zip(a.method.state_dict().values(), b.method.state_dict().values()):
        assert torch.equal(pa, pb)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    log = []
    # Step.step 5 is the 6th step: numbered 6, as log.jsonl numbers it
    with pytest.raises(NonFiniteLossError, match=r"step 6 .*checkpoint\.pth \(step 4\), is intact"):
        _train(tmp_path, 0, log, method=ToyMethod(nan_at_step=5), ckpt_every=4)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # the bad step is not logged as a number
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["position"]["step"] == 4  # the last good checkpoint, untouched by the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


class PoisonedUpdate(ToyMethod):
    """The loss stays finite, but the update after step ``at`` leaves NaN weights (as a too-large lr can)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    @torch.no_grad()
    def after_optimizer_step(self, step):
        super().after_optimizer_step(step)
        if step.step == self.at:
            self.backbone.weight.fill_(float("nan"))


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    """Checkpoint every step; the update of step 3 poisons the weights while its loss was finite: the step-3
    checkpoint is refused, the step-2 one stays, and auto-resume would find finite weights."""
    with pytest.raises(NonFiniteLossError, match=r"weights are not finite after step 3 .*\(step 2\), is intact"):
        _train(tmp_path, 0, [], method=PoisonedUpdate(at=2), ckpt_every=1, log_every=10**6)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for st in ckpt["optimizer"]["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor))


def test_non_finite_message_says_when_no_checkpoint_exists(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint of this run exists"):
        _train(tmp_path, 0, [], method=ToyMethod(nan_at_step=2), ckpt_every=1000)
    assert not (tmp_path / "checkpoint.pth").exists()


def test_resume_rejects_a_foreign_file(tmp_path):
    torch.save({"something": 1}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="checkpoint.pth lacks"):
        _train(tmp_path, 2, [])


def test_auto_resume_refuses_another_configurations_checkpoint(tmp_path):
    run = dict(arch="resnet18", queue_size=40, max_steps=4)
    _train(tmp_path, 4, [], extra=run)
    with pytest.raises(ValueError, match=r"checkpoint.pth is from another configuration \(--arch 'resnet18' -> "
                                         r"'resnet50', --queue-size 40 -> 4096\)"):
        _train(tmp_path, 6, [], extra={**run, "arch": "resnet50", "queue_size": 4096})
    log = []
    _train(tmp_path, 6, log, extra={**run, "max_steps": 6})  # run-control options may change
    assert [r["step"] for r in log] == [5, 6]


def test_auto_resume_names_another_methods_checkpoint(tmp_path):
    """A checkpoint of another method in --out is named by its method (was: a list of the two recipes' differing
    options, half of them None)."""
    run = dict(arch="resnet18", queue_size=40, max_steps=4)
    _train(tmp_path, 4, [], extra=run)

    class OtherMethod(ToyMethod):
        pass

    with pytest.raises(ValueError, match=r"checkpoint.pth was written by ToyMethod, not OtherMethod; pass --out "
                                         r"NEW_DIR"):
        _train(tmp_path, 6, [], method=OtherMethod(), extra={"arch": "vit_small", "out_dim": 65536})


def test_resume_into_a_different_model_names_the_file(tmp_path):
    _train(tmp_path, 2, [])
    wider = ToyMethod()
    wider.backbone = nn.Linear(8, 8, bias=False)  # a state_dict that does not fit
    with pytest.raises(ValueError, match=r"checkpoint.pth does not fit this model .*--out NEW_DIR"):
        _train(tmp_path, 4, [], method=wider)


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist_info = init_distributed("cpu")
    cfg = TrainConfig(out_dir=out_dir, epochs=2, batch_size=12, optimizer="sgd", lr=0.1, weight_decay=1e-3,
                      log_every=1, amp="none", resume="none")
    t = Trainer(ToyMethod(), ToyLoader(batch_size=12 // world, rank=rank, world_size=world, noise=False),
                cfg, dist_info)
    t.fit()
    if rank == 0:
        torch.save(t.method.state_dict(), result_path)
    shutdown_distributed()


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")), nprocs=2,
                       start_method="spawn")
    cfg = TrainConfig(out_dir=str(tmp_path / "one"), epochs=2, batch_size=12, optimizer="sgd", lr=0.1,
                      weight_decay=1e-3, log_every=1, amp="none", resume="none")
    single = Trainer(ToyMethod(), ToyLoader(batch_size=12, noise=False), cfg, CPU)
    single.fit()
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for k, v in single.method.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6)


class RandomBufferMethod(ToyMethod):
    """ToyMethod initialised from the global RNG (seeded per rank, as recipes do) with a random buffer (like a
    MoCo queue / InstDisc bank), going non-finite at one step on one rank only."""

    def __init__(self, nan_at_step=None):
        weight, queue = torch.randn(8, 8), torch.randn(5, 8)  # the caller's (rank-seeded) RNG: ToyMethod reseeds
        super().__init__(nan_at_step)
        with torch.no_grad():
            self.backbone.weight.copy_(weight)
        self.register_buffer("queue", queue)


class NormToyMethod(ToyMethod):
    """ToyMethod through a BatchNorm (no SyncBN): its running statistics follow each rank's own shard."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(8, affine=False)

    def forward(self, views, step):
        return {"loss": F.mse_loss(self.backbone(self.norm(views[0])), views[1])}


def _ddp_agreement_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist_info = init_distributed("cpu")
    torch.manual_seed(100 + rank)  # every rank builds a different random method
    cfg = TrainConfig(out_dir=out_dir, epochs=2, batch_size=12, optimizer="sgd", lr=0.1, weight_decay=1e-3,
                      log_every=1, amp="none", resume="none")
    t = Trainer(RandomBufferMethod(nan_at_step=3 if rank == 1 else None),
                ToyLoader(batch_size=12 // world, rank=rank, world_size=world, noise=False), cfg, dist_info)
    start = {k: v.clone() for k, v in t.method.state_dict().items()}
    try:
        t.fit()
        error = None
    except NonFiniteLossError as e:
        error = str(e)
    t = Trainer(NormToyMethod(), ToyLoader(batch_size=12 // world, rank=rank, world_size=world, noise=False),
                dataclasses.replace(cfg, out_dir=os.path.join(out_dir, "bn")), dist_info)
    t.fit()  # ends with a checkpoint: the statistics are synchronised for it
    torch.save({"start": start, "error": error, "bn": t.method.norm.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_distributed()


def test_ddp_ranks_start_equal_and_stop_together_on_one_ranks_nan(tmp_path):
    # Without the broadcast the queues differ per rank; without agreeing on the check, rank 1 raises at step 3
    # while rank 0 (its own loss still finite) waits forever in the next gradient all-reduce.
    mp.start_processes(_ddp_agreement_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert set(r0["start"]) >= {"queue", "backbone.weight"}
    for k in r0["start"]:
        assert torch.equal(r0["start"][k], r1["start"][k]), k
    assert r0["error"] is not None and "step 4" in r0["error"]  # (Step.step 3: the 4th step)
    assert r1["error"] is not None and "step 4" in r1["error"]
    # each rank normalised its own shard, yet kNN and checkpoints see one model: rank 0's statistics
    ckpt = torch.load(tmp_path / "bn" / "checkpoint.pth", weights_only=False)
    for k in ("running_mean", "running_var"):
        assert torch.equal(r0["bn"][k], r1["bn"][k]) and torch.equal(r0["bn"][k], ckpt["model"][f"norm.{k}"]), k


class _HostSyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that are a host-device sync on CUDA: reading a scalar back (``.item()``, ``float(t)``,
    ``bool(t)``: ``_local_scalar_dense``) and making a tensor from Python data (``torch.tensor(x, device=...)``:
    ``lift_fresh``, a pageable host->device copy). Seen on CPU tensors too, so CI counts them without a GPU."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNC_OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_steady_state_step_has_no_host_sync(tmp_path):
    """Between two log/checkpoint points a step reads nothing back and makes no tensor from host data
    (was: torch.tensor(step, device=...) every step for the non-finite bookkeeping)."""
    marks = []

    class Marked(ToyMethod):
        def after_optimizer_step(self, step):
            super().after_optimizer_step(step)
            marks.append(counter.count)

    counter = _HostSyncCounter()
    with counter:
        _train(tmp_path, 8, [], method=Marked(), log_every=10**6, ckpt_every=0)
    steady = [b - a for a, b in zip(marks[1:-1], marks[2:])]  # steps 2..7: no log, checkpoint or epoch end
    assert len(steady) == 6 and steady == [0] * 6, steady
    assert counter.count > 0  # the counter sees syncs: the final non-finite check and the checkpoint read one


def test_the_bar_shows_the_loss_from_the_first_step(tmp_path, monkeypatch):
    """The first step of a run reads its loss once for the progress bar (was: nothing until the first log step,
    10 steps in by default); the steps after it read nothing until a log step."""
    from fastcl.engine import logging as flog

    shown = []
    monkeypatch.setattr(flog.Progress, "update", lambda self, n=1, **postfix: shown.append(postfix))
    log, every_step = [], []
    torch.manual_seed(0)
    _train(tmp_path / "a", 5, log, log_every=4, ckpt_every=0)
    assert [sorted(p) for p in shown[:4]] == [["loss", "lr"], [], [], ["img_s", "loss", "lr"]]
    torch.manual_seed(0)
    _train(tmp_path / "b", 1, every_step, log_every=1, ckpt_every=0)  # the same first step, logged
    assert shown[0]["loss"] == f"{every_step[0]['loss']:.4f}"
    assert shown[3]["loss"] == f"{log[0]['loss']:.4f}" and log[0]["step"] == 4


def test_non_finite_step_is_still_named_without_a_sync_per_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 7"):
        _train(tmp_path, 0, [], method=ToyMethod(nan_at_step=6), log_every=10**6, ckpt_every=0)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_steady_step_launches_one_kernel_more_than_a_hand_written_loop(tmp_path):
    """Host overhead, counted (an op that moves data is a kernel launch on CUDA): a steady Trainer step (no log,
    checkpoint or epoch end) dispatches the ops of a hand-written loop of the same method, optimizer and EMA,
    plus the copy of the loss into the device buffer the non-finite check reads at log steps (and the loss's
    detached view; the buffer's per-step slots are views made once per run, was a select every step) -- was 10
    ops: isfinite (4 on CPU), not, and, lt, where and add keeping the first bad step number on the device."""
    from fastcl.engine.optim import build_optimizer
    from fastcl.methods.base import Step

    marks, counter = [], _OpCounter()

    class Marked(ToyMethod):
        def after_optimizer_step(self, step):
            super().after_optimizer_step(step)
            marks.append(len(counter.ops))

    with counter:
        t = _train(tmp_path, 8, [], method=Marked(), log_every=10**6, ckpt_every=0)
    engine = [counter.ops[a:b] for a, b in zip(marks[1:-1], marks[2:])]  # steps 2..7

    method, loader = ToyMethod(), ToyLoader()
    opt = build_optimizer("sgd", method.param_groups(1e-3), lr=0.1, momentum=0.9)
    loader.set_epoch(0)
    ends, counter = [], _OpCounter()
    with counter:
        for i, (views, _, _) in enumerate(loader):  # (the loader's ops count in both)
            step = Step(i, 0, len(loader), 3 * len(loader), {"lr": 0.1, "momentum": float(t.schedules["momentum"][i])})
            loss = method(views, step)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_optimizer_step(step)
            ends.append(len(counter.ops))
    hand = [counter.ops[a:b] for a, b in zip(ends, ends[1:])]  # steps 2, 3, ...
    assert len(engine) == 6 and len(hand) >= 3
    from collections import Counter

    extra = [sorted((Counter(e) - Counter(hand[1])).elements()) for e in engine]
    assert all(Counter(hand[1]) - Counter(e) == Counter() for e in engine)  # all of the hand loop's ops, and
    assert extra == [["aten.copy_.default", "aten.detach.default"]] * 6, extra  # these
