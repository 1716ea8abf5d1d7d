"""DeepSpeed ZeRO-1/2 in the Trainer: equal to DDP on the same global batch (lr/wd schedules, a DINO-like
per-parameter gradient hook, global clip, EMA teacher, per-rank random init), optimizer state really
partitioned, exact resume from the shards in a fresh launch, and clear errors for what it cannot do.

Two gloo processes per launch via ``python -m torch.distributed.run`` on this file (``__main__`` below).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastcl.engine.distributed import shutdown_distributed
from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo, all_reduce_, init_distributed
from fastcl.engine.optim import cosine_schedule
from fastcl.engine.zero import ZeroEngine, check_zero_options
from fastcl.methods.base import Method

REPO = Path(__file__).resolve().parents[2]
STEPS = 12  # 3 epochs x 4 batches of 12 (6 per rank)
CUT = 5  # the interrupted run stops here, mid-epoch
FREEZE_CUT = 2  # ... and the one with a frozen layer, inside the freeze (epoch 0)


# ---------------------------------------------------------------------------------------------- toys
class Loader:
    """The loader protocol over fixed data; interleaved rank shards of one fixed global batch per step;
    the second view draws from the global RNG (so resume must restore it)."""

    def __init__(self, batch_size, rank, world_size, n=48, dim=8):
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(1234))
        self.bs, self.rank, self.world = batch_size, rank, world_size
        self.epoch, self.start = 0, 0

    def __len__(self):
        return len(self.x) // (self.bs * self.world)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(self.start, len(self)):
            idx = perm[i * self.bs * self.world:(i + 1) * self.bs * self.world][self.rank::self.world]
            x = self.x[idx]
            yield [x, x.flip(1) + 0.05 * torch.randn_like(x)], torch.zeros(len(idx), dtype=torch.long), idx


class Toy(Method):
    """MLP student regressed onto an EMA teacher and the other view, with a centre buffer (all-reduced),
    a DINO-style per-parameter gradient clip in before_optimizer_step (optionally dropping one grad, or
    freezing the last layer for the first epoch as DINO does, declared in skippable_parameters)."""

    def __init__(self, clip_param=0.02, drop_grad=False, freeze=False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.target = copy.deepcopy(self.backbone).requires_grad_(False)
        # buffers start equal on every rank (the methods' contract: neither DDP nor DeepSpeed syncs them)
        self.register_buffer("center", torch.randn(8, generator=torch.Generator().manual_seed(3)))
        self.clip_param, self.drop_grad, self.freeze = clip_param, drop_grad, freeze

    def skippable_parameters(self):
        return list(self.backbone[2].parameters()) if self.freeze else []  # (a weight and a bias: two groups)

    def schedules(self, epochs, steps_per_epoch):
        return {"momentum": cosine_schedule(0.9, 1.0, epochs, steps_per_epoch)}

    def forward(self, views, step):
        z = self.backbone(views[0])
        with torch.no_grad():
            t = self.target(views[1]) - self.center
        self._batch_center = t.mean(0)
        return {"loss": F.mse_loss(z, t) + F.mse_loss(z, views[1])}

    @torch.no_grad()
    def before_optimizer_step(self, step):
        if self.clip_param:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_((self.clip_param / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if self.drop_grad:
            self.backbone[2].bias.grad = None
        if self.freeze and step.epoch < 1:
            for p in self.backbone[2].parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step):
        for pt, po in zip(self.target.parameters(), self.backbone.parameters()):
            pt.lerp_(po, 1 - step["momentum"])
        self.center.mul_(0.9).add_(all_reduce_(self._batch_center.clone(), "mean"), alpha=0.1)


def _cfg(out, **kw):
    base = dict(out_dir=str(out), epochs=3, batch_size=12, optimizer="adamw", lr=0.05, weight_decay=0.05,
                weight_decay_end=0.2, warmup_epochs=1, clip_grad=0.03, log_every=1, amp="none", resume="none")
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- worker
def _state_numel(opt) -> int:
    return sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def _worker(phase: str, out: Path) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size

    def train(name, cfg_kw=None, method_kw=None):
        torch.manual_seed(100 + rank)  # per-rank init and RNG (as cli.run): the engine must sync rank 0's
        losses = []
        cfg = _cfg(out / name, **(cfg_kw or {}))
        with warnings.catch_warnings(record=True) as caught:  # (what a user sees when the run starts)
            warnings.simplefilter("always")
            t = Trainer(Toy(**(method_kw or {})), Loader(cfg.batch_size // world, rank, world), cfg, info,
                        log_fn=lambda r: losses.append(r["loss"]))
        setup_warnings[name] = [f"{w.category.__name__}: {w.message}" for w in caught]
        init[name] = {k: v.detach().clone() for k, v in t.method.state_dict().items()}  # (rank 0's, synced)
        t.fit()
        return t, losses

    res, init, setup_warnings = {}, {}, {}
    if phase == "train":
        for name, cfg_kw, method_kw in [
                ("ddp", {}, {}), ("ddp_nohook", {}, {"clip_param": 0.0}),
                ("zero1", {"zero_stage": 1}, {}), ("zero2", {"zero_stage": 2}, {}),
                ("ddp_sgd", {"optimizer": "sgd", "lr": 0.5}, {}),
                ("ddp_sgd_noclip", {"optimizer": "sgd", "lr": 0.5, "clip_grad": 0.0}, {}),
                ("zero2_sgd", {"optimizer": "sgd", "lr": 0.5, "zero_stage": 2}, {}),
                ("zero2_cut", {"zero_stage": 2, "max_steps": CUT, "ckpt_every": 2}, {}),
                ("ddp_freeze", {}, {"freeze": True}), ("zero1_freeze", {"zero_stage": 1}, {"freeze": True}),
                ("zero2_freeze", {"zero_stage": 2}, {"freeze": True}),
                ("ddp_freeze_sgd", {"optimizer": "sgd", "lr": 0.5}, {"freeze": True}),
                ("zero2_freeze_sgd", {"optimizer": "sgd", "lr": 0.5, "zero_stage": 2}, {"freeze": True}),
                ("zero2_freeze_cut", {"zero_stage": 2, "max_steps": FREEZE_CUT, "ckpt_every": 1}, {"freeze": True})]:
            t, losses = train(name, cfg_kw, method_kw)
            r = {"state": {k: v.detach().clone() for k, v in t.method.state_dict().items()}, "losses": losses,
                 "state_numel": _state_numel(t.optimizer), "init": init[name]}
            r["setup_warnings"] = setup_warnings[name]
            if t.zero is None:  # DDP: where the gradients live (views into the all-reduce buckets?)
                grads = [p.grad for p in t.method.parameters() if p.grad is not None]
                storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
                r.update(trainable=sum(p.numel() for p in t.method.parameters() if p.requires_grad),
                         n_grads=len(grads), grad_storages=len(storages), grad_storage_bytes=sum(storages.values()))
            else:
                e = t.zero.engine
                r.update(stage=e.zero_optimization_stage(), grads_partitioned=e.zero_optimization_partition_gradients(),
                         lr_in_real_optimizer=[g["lr"] for g in t.zero.zero_optimizer.optimizer.param_groups],
                         lr_scheduled=[float(t.schedules["lr"][t.step - 1])],
                         trainable=sum(p.numel() for p in t.method.parameters() if p.requires_grad),
                         ds_master=sum(x.numel() for x in e.optimizer.single_partition_of_fp32_groups),
                         # (the size of what each backward allocates; released after the step)
                         ds_bucket=int(e.optimizer.reduce_bucket_size))
            numels = [None] * world
            dist.all_gather_object(numels, r["state_numel"])
            r["state_numel_per_rank"] = numels
            res[name] = r
        try:
            train("zero2_drop", {"zero_stage": 2}, {"drop_grad": True})
            res["drop_error"] = None
        except ValueError as e:
            res["drop_error"] = str(e)
    elif phase == "single":  # one plain process with the torchrun variables set: ZeroEngine makes the group
        for name, cfg_kw in (("single_plain", {}), ("single_zero2", {"zero_stage": 2})):
            t, _ = train(name, cfg_kw)
            res[name] = {k: v.detach().clone() for k, v in t.method.state_dict().items()}
        res["world_size"] = dist.get_world_size()
    elif phase == "resume":  # a fresh launch continues zero2_cut (and zero2_freeze_cut) from its checkpoint
        for name, method_kw in (("zero2_cut", {}), ("zero2_freeze_cut", {"freeze": True})):
            t, losses = train(name, {"zero_stage": 2, "resume": "auto"}, method_kw)
            res[name.replace("cut", "resumed")] = {
                "state": {k: v.detach().clone() for k, v in t.method.state_dict().items()}, "losses": losses,
                "step": t.step}
    if rank == 0:
        torch.save(res, out / f"{phase}.pt")
    shutdown_distributed()


def _launch(phase: str, out: Path, nproc: int = 2, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's one compiled op
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    proc = subprocess.run([sys.executable, *launcher, __file__, phase, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{phase} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    train = _launch("train", out)
    resume = _launch("resume", out)
    return out, train, resume


@pytest.mark.slow
def test_zero1_and_zero2_equal_ddp_with_hook_clip_and_schedules(runs):
    _, r, _ = runs
    # the setup is sensitive: the per-parameter hook (AdamW) and the global clip (SGD) change the result
    assert _differs(r["ddp"]["state"], r["ddp_nohook"]["state"])
    assert _differs(r["ddp_sgd"]["state"], r["ddp_sgd_noclip"]["state"])
    for name in ("zero1", "zero2"):
        _close(r[name]["state"], r["ddp"]["state"], rtol=1e-5, atol=1e-6)
        assert r[name]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-5, abs=1e-7)
        assert len(r[name]["losses"]) == STEPS
    _close(r["zero2_sgd"]["state"], r["ddp_sgd"]["state"], rtol=1e-5, atol=1e-6)
    assert _differs(r["zero2_sgd"]["state"], r["zero2"]["state"])
    # the schedule's lr is what the optimizer DeepSpeed steps actually holds
    for name in ("zero1", "zero2", "zero2_sgd"):
        assert r[name]["lr_in_real_optimizer"][0] == pytest.approx(r[name]["lr_scheduled"][0])


@pytest.mark.slow
def test_zero_partitions_optimizer_state_and_gradients(runs):
    _, r, _ = runs
    assert (r["zero1"]["stage"], r["zero1"]["grads_partitioned"]) == (1, False)
    assert (r["zero2"]["stage"], r["zero2"]["grads_partitioned"]) == (2, True)
    for name, ref in (("zero1", "ddp"), ("zero2", "ddp"), ("zero2_sgd", "ddp_sgd")):
        full = r[ref]["state_numel_per_rank"]
        assert full[0] == full[1] > 0  # DDP: every rank holds all of it
        mine = r[name]["state_numel_per_rank"]
        assert sum(mine) >= full[0]  # ... ZeRO: together all of it (+ alignment padding),
        for n in mine:  # each rank about half
            assert 0.4 * full[0] <= n <= 0.5 * full[0] + 64


def test_ddp_gradients_are_views_into_its_buckets(runs):
    """DDP with gradient_as_bucket_view: every p.grad lives in DDP's all-reduce bucket (one flat buffer for this
    toy), so the gradients cost 4 bytes per trained parameter, not 8 (p.grad + bucket; failed before: one storage
    per gradient, 4 of them) -- also after a freeze set some of them to None for an epoch."""
    from fastcl.engine.memory_model import state_bytes
    _, r, _ = runs
    for name in ("ddp", "ddp_freeze", "ddp_sgd"):
        d = r[name]
        assert d["n_grads"] == 4 and d["grad_storages"] == 1, (name, d["n_grads"], d["grad_storages"])
        assert d["grad_storage_bytes"] == state_bytes(trainable=d["trainable"], frozen=0, zero_stage=0,
                                                      world=2)["grads"]


def test_ddp_starts_without_a_deprecation_warning(runs):
    """Setting up DDP warns nothing: torch 2.14 deprecated ``broadcast_buffers`` (a FutureWarning on every rank of
    every run, failed before) for ``forward_sync_buffers``, which torch 2.11 does not have; the engine passes the
    one the installed torch takes."""
    _, r, _ = runs
    for name in ("ddp", "ddp_sgd"):
        assert not [w for w in r[name]["setup_warnings"] if "DistributedDataParallel" in w or "buffers" in w], \
            r[name]["setup_warnings"]


def test_zero_state_per_rank_is_what_the_memory_model_counts(runs):
    """DeepSpeed's own buffers on each rank equal ``memory_model.state_bytes``: AdamW moments + the fp32 master
    partition (3 x P/W), and a gradient reduce bucket of min(5e8, P) elements, which each backward allocates --
    DeepSpeed's default is 5e8 elements (1.9 GiB) whatever the model (failed before the cap: 500,000,000 for this
    toy)."""
    from fastcl.engine.memory_model import state_bytes
    _, r, _ = runs
    for name, stage in (("zero1", 1), ("zero2", 2)):
        z = r[name]
        P = z["trainable"]
        assert z["ds_bucket"] == P, (name, z["ds_bucket"], P)
        model = state_bytes(trainable=P, frozen=0, zero_stage=stage, world=2)
        held = 4 * (z["state_numel"] + z["ds_master"])
        assert model["optimizer"] <= held <= model["optimizer"] + 3 * 4 * 64, (name, held, model)  # + alignment
        assert model["grads"] == 4 * ((P if stage == 1 else P / 2) + z["ds_bucket"])


@pytest.mark.slow
def test_zero2_resume_in_a_fresh_launch_equals_uninterrupted(runs):
    out, r, res = runs
    resumed, full = res["zero2_resumed"], r["zero2"]
    assert resumed["step"] == STEPS
    assert r["zero2_cut"]["losses"] + resumed["losses"] == full["losses"]  # bit-exact, RNG included
    for k, v in full["state"].items():
        assert torch.equal(resumed["state"][k], v), k
    # one shard set per checkpoint name: older tags pruned once checkpoint.pth points at the new one
    tags = [d.name for d in (out / "zero2_cut" / "zero").iterdir() if d.is_dir()]  # (+ DeepSpeed's zero_to_fp32.py)
    ckpt = torch.load(out / "zero2_cut" / "checkpoint.pth", weights_only=False)
    assert ckpt["optimizer"] is None and tags == [ckpt["zero"]["tag"]]
    assert tags[0].startswith(f"checkpoint-step{STEPS:09d}")  # (saved twice at the last step: a fresh tag)


@pytest.mark.slow
def test_zero_honours_a_declared_freeze_as_ddp_does(runs):
    """DINO's --freeze-last-layer / SwAV's prototype freeze under ZeRO: a layer declared in skippable_parameters
    whose gradients the hook drops for the first epoch (4 steps of 12) is left bit-identical during the freeze,
    and the whole run equals DDP's, where the optimizer skips it (AdamW: no decay, no moments, no step count;
    SGD: no momentum buffer) -- also across a checkpoint taken inside the freeze and a fresh launch."""
    _, r, res = runs
    assert _differs(r["ddp_freeze"]["state"], r["ddp"]["state"])  # the freeze changes the result
    assert _differs(r["ddp_freeze_sgd"]["state"], r["ddp_sgd"]["state"])
    for name in ("zero1_freeze", "zero2_freeze"):
        _close(r[name]["state"], r["ddp_freeze"]["state"], rtol=1e-5, atol=1e-6)
        assert r[name]["losses"] == pytest.approx(r["ddp_freeze"]["losses"], rel=1e-5, abs=1e-7)
    _close(r["zero2_freeze_sgd"]["state"], r["ddp_freeze_sgd"]["state"], rtol=1e-5, atol=1e-6)
    cut = r["zero2_freeze_cut"]  # 2 steps, inside the freeze
    for k in ("backbone.2.weight", "backbone.2.bias"):
        assert torch.equal(cut["state"][k], cut["init"][k]), k
    assert not torch.equal(cut["state"]["backbone.0.weight"], cut["init"]["backbone.0.weight"])
    resumed = res["zero2_freeze_resumed"]
    assert resumed["step"] == STEPS
    assert cut["losses"] + resumed["losses"] == r["zero2_freeze"]["losses"]
    for k, v in r["zero2_freeze"]["state"].items():
        assert torch.equal(resumed["state"][k], v), k


@pytest.mark.slow
def test_zero_rejects_a_hook_that_drops_a_gradient(runs):
    _, r, _ = runs
    msg = r["drop_error"]
    assert msg is not None and "--zero-stage 2" in msg and "backbone.2.bias" in msg and "None" in msg
    assert "skippable_parameters()" in msg


@pytest.mark.slow
def test_zero_checkpoint_needs_the_same_zero_layout(runs, tmp_path):
    out, _, _ = runs
    path = out / "zero2_cut" / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=False)
    with pytest.raises(ValueError, match="resume with --zero-stage 2 on 2 processes"):  # plain DDP / one process
        Trainer(Toy(), Loader(12, 0, 1), _cfg(tmp_path, resume=str(path)), DistInfo(0, 1, 0, torch.device("cpu")))
    with pytest.raises(ValueError, match="written with --zero-stage 2 on 2 processes"):
        ZeroEngine.check_resumable(ckpt, path, 1, 2)
    with pytest.raises(ValueError, match="written with --zero-stage 2 on 2 processes"):
        ZeroEngine.check_resumable(ckpt, path, 2, 4)
    plain = {**ckpt, "zero": None}
    with pytest.raises(ValueError, match="plain .unpartitioned. optimizer state"):
        ZeroEngine.check_resumable(plain, path, 2, 2)


@pytest.mark.slow
def test_zero_in_one_process_with_the_torchrun_environment(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = _launch("single", tmp_path, nproc=0, env_extra=env)
    assert r["world_size"] == 1
    _close(r["single_zero2"], r["single_plain"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(stage=3), "--zero-stage 3 is not supported"),
    (dict(optimizer="lamb"), "--zero-stage 2 supports --optimizer sgd, adamw and lars"),
    (dict(amp="fp16"), "--amp fp16 with --zero-stage 2"),
    (dict(world_size=1), "launch with torchrun"),
])
def test_zero_rejects_unsupported_options(kw, match, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    args = {"stage": 2, "optimizer": "adamw", "amp": "none", "world_size": 2, **kw}
    with pytest.raises(ValueError, match=match):
        check_zero_options(args.pop("stage"), **args)


def test_zero_without_deepspeed_names_the_option(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ValueError, match="--zero-stage 1 needs DeepSpeed"):
        Trainer(Toy(), Loader(12, 0, 2), _cfg(tmp_path, zero_stage=1), DistInfo(0, 2, 0, torch.device("cpu")))


def test_cli_flag_reaches_the_train_config():
    from fastcl.cli import base_parser, parse_args, train_config

    import argparse

    parser = argparse.ArgumentParser(parents=[base_parser()])
    preset = {"cifar": dict(arch="x", epochs=1, batch_size=8, lr=0.1, warmup_epochs=0, optimizer="adamw", wd=0.0,
                            clip_grad=0.0, knn_every=0)}
    assert train_config(parse_args(parser, preset, []), "r").zero_stage == 0
    assert train_config(parse_args(parser, preset, ["--zero-stage", "2"]), "r").zero_stage == 2
    with pytest.raises(SystemExit):
        parse_args(parser, preset, ["--zero-stage", "4"])


if __name__ == "__main__":  # one torchrun worker: python -m torch.distributed.run ... test_zero.py PHASE OUT
    _worker(sys.argv[1], Path(sys.argv[2]))
