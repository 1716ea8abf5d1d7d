"""The Trainer's step against a hand-written reference of the same math, on every path its hot loop takes apart
(amp off / fp16 with an enabled GradScaler / bf16, with and without clipping), and its NVTX ranges: the loop looks
these up once per run and skips what does nothing (a disabled scaler, autocast with amp off, NVTX without a tool)."""
import os
import types

import pytest
import torch

from fastcl.engine import TrainConfig, Trainer
from fastcl.engine import logging as flog
from fastcl.engine.optim import build_optimizer, cosine_schedule
from fastcl.methods.base import Step

from test_engine import CPU, ToyLoader, ToyMethod, _train  # (tests/engine is on sys.path under pytest's rootdir)

STEPS = 10  # 8 steps per epoch: one epoch end (a checkpoint) inside


def _reference(cfg: TrainConfig, steps: int):
    """The step as the engine wrote it before its loop was trimmed: scheduled lr / wd written into the groups,
    forward under autocast, zero_grad, scaled backward, hook, unscale + clip, scaler step + update, hook."""
    method, loader = ToyMethod(), ToyLoader(noise=False)
    amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.amp == "fp16")
    groups = method.param_groups(cfg.weight_decay)
    for g in groups:
        g["base_wd"] = g["weight_decay"]
    opt = build_optimizer("sgd", groups, lr=cfg.lr, momentum=cfg.momentum, device=torch.device("cpu"))
    spe = len(loader)
    lrs = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, spe, cfg.warmup_epochs)
    wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay, cfg.epochs, spe)
    moms = method.schedules(cfg.epochs, spe)["momentum"]
    losses, step = [], 0
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        for views, _, _ in loader:
            if step == steps:
                return method, scaler, losses
            lr, wd = float(lrs[step]), float(wds[step])
            for g in opt.param_groups:
                g["lr"] = lr
                if g["base_wd"] > 0:
                    g["weight_decay"] = wd * g["base_wd"] / cfg.weight_decay
            info = Step(step, epoch, spe, cfg.epochs * spe, {"lr": lr, "wd": wd, "momentum": float(moms[step])})
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = method(views, info)["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            method.before_optimizer_step(info)
            if cfg.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad, foreach=True)
            scaler.step(opt)
            scaler.update()
            method.after_optimizer_step(info)
            losses.append(float(loss.detach()))
            step += 1
    return method, scaler, losses


@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_the_step_equals_a_hand_written_one_bit_for_bit(amp, clip_grad, tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=3, batch_size=6, optimizer="sgd", lr=0.1, weight_decay=1e-3,
                      warmup_epochs=1, max_steps=STEPS, amp=amp, clip_grad=clip_grad, log_every=1, resume="none")
    log = []
    t = Trainer(ToyMethod(), ToyLoader(noise=False), cfg, CPU, log_fn=log.append)
    t.fit()
    method, scaler, losses = _reference(cfg, STEPS)
    assert [r["loss"] for r in log] == losses
    for (k, a), b in zip(t.method.state_dict().items(), method.state_dict().values()):
        assert torch.equal(a, b), k
    assert t.scaler.is_enabled() == (amp == "fp16") and t.scaler.state_dict() == scaler.state_dict()


class _Range:
    """Records enter / exit of the ranges the engine builds (what nvtx.annotate would push / pop)."""

    events: list = []

    def __init__(self, message, domain=None):
        assert domain == "fastcl"
        self.message = message

    def __enter__(self):
        self.events.append(self.message)

    def __exit__(self, *exc):
        self.events.append("/" + self.message)


@pytest.mark.parametrize("attached", [True, False])
def test_nvtx_ranges_are_entered_every_step_when_a_tool_is_attached(attached, tmp_path, monkeypatch):
    """The ranges are built once per run and entered every step (an annotate is reusable); without a tool none is
    built (nvtx would record nothing)."""
    _Range.events = []
    monkeypatch.setattr(flog, "_nvtx", types.SimpleNamespace(annotate=_Range))
    monkeypatch.setattr(flog, "_nvtx_attached", lambda: attached)
    _train(tmp_path, 3, [], log_every=10**6, ckpt_every=0)
    step = ["data", "/data", "forward", "/forward", "backward", "/backward", "optimizer", "/optimizer", "ema", "/ema"]
    assert _Range.events == (step * 3 + ["checkpoint", "/checkpoint"] if attached else [])


@pytest.mark.skipif(flog._nvtx is None or any(k.startswith("NVTX_INJECTION") for k in os.environ),
                    reason="nvtx missing, or an NVTX tool may be attached")
def test_no_nvtx_tool_means_no_range_objects():
    assert not flog._nvtx_attached()
    assert flog.nvtx_range("data") is flog.nvtx_range("forward")  # one shared no-op context
