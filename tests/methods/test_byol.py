"""BYOL: loss vs the paper's formula (float64), the target network moves only by EMA with the scheduled
τ, hyperparameter checks, and a short run of the recipe on real CIFAR-10 (loss falls, no collapse)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.byol import BYOL, collapse_std
from recipe_loader import load_recipe

recipe = load_recipe("byol_r50")


def log_records(out_dir):
    return [r for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_byol(**kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU())
    return BYOL(net, 16, **{"proj_hidden": 32, "dim": 8, "pred_hidden": 32, **kw})


def step(tau=0.996):
    return Step(0, 0, 1, 1, {"tau": tau, "lr": 0.1})


def test_loss_matches_paper_formula_float64():
    byol = tiny_byol().double()
    v1, v2 = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():  # make the target differ from the online network, as after some training
        for p in byol.projector_t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss = byol([v1, v2], step())["loss"]
    # literal transcription of Sec. 3: q = q_θ(g_θ(f_θ(v))), z' = g_ξ(f_ξ(v')),
    # L = || q/||q|| - z'/||z'|| ||², summed over the two directions, averaged over the batch
    with torch.no_grad():
        q1 = byol.predictor(byol.projector(byol.backbone(v1)))
        q2 = byol.predictor(byol.projector(byol.backbone(v2)))
        z1 = byol.projector_t(byol.backbone_t(v1))
        z2 = byol.projector_t(byol.backbone_t(v2))
    total = 0.0
    for i in range(6):
        for q, z in ((q1[i], z2[i]), (q2[i], z1[i])):
            qn = [float(a) / math.sqrt(sum(float(b) ** 2 for b in q)) for a in q]
            zn = [float(a) / math.sqrt(sum(float(b) ** 2 for b in z)) for a in z]
            total += sum((a - b) ** 2 for a, b in zip(qn, zn))
    assert float(loss.detach()) == pytest.approx(total / 6, rel=1e-10)


def test_tau_schedule_is_the_papers():
    byol = tiny_byol()
    K = 7 * 13
    tau = byol.schedules(7, 13)["tau"]
    ref = [1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    np.testing.assert_allclose(tau, ref, rtol=0, atol=1e-12)


def test_target_moves_only_by_ema_online_by_gradient():
    byol = tiny_byol()
    target = [*byol.backbone_t.parameters(), *byol.projector_t.parameters()]
    online = [*byol.backbone.parameters(), *byol.projector.parameters()]
    assert all(not p.requires_grad for p in target)
    trained = {id(p) for g in byol.param_groups(1e-4) for p in g["params"]}
    assert not trained & {id(p) for p in target}  # the optimizer never sees the target
    assert {id(p) for p in byol.predictor.parameters()} <= trained
    opt = torch.optim.SGD(byol.param_groups(0.0), lr=0.5)
    x = [torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)]
    for tau in (0.9, 0.99):
        t0 = [p.detach().clone() for p in target]
        o0 = [p.detach().clone() for p in online]
        opt.zero_grad()
        byol(x, step(tau))["loss"].backward()
        assert all(p.grad is None for p in target)
        assert all(p.grad is not None for p in byol.predictor.parameters())
        byol.before_optimizer_step(step(tau))
        opt.step()
        for pt, pt0 in zip(target, t0):  # the optimizer step leaves the target alone
            assert torch.equal(pt, pt0)
        byol.after_optimizer_step(step(tau))
        assert any(not torch.equal(p, p0) for p, p0 in zip(online, o0))
        for pt, pt0, po in zip(target, t0, online):
            torch.testing.assert_close(pt, tau * pt0 + (1 - tau) * po)  # ξ <- τξ + (1 − τ)θ exactly


@pytest.mark.parametrize("kw, bad", [(dict(tau=1.5), "1.5"), (dict(tau=0.99, tau_end=0.9), "0.9"),
                                     (dict(dim=0), "dim"), (dict(pred_hidden=-1), "pred_hidden")])
def test_bad_hyperparameters_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        tiny_byol(**kw)


def test_collapse_indicator():
    d = 64
    healthy = collapse_std(torch.randn(512, d))
    assert healthy == pytest.approx(1 / math.sqrt(d), rel=0.1)
    assert collapse_std(torch.randn(1, d).expand(512, d) + 1e-6 * torch.randn(512, d)) < 1e-3


def test_imagenet_preset_is_the_papers():
    args = recipe.cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, ["--data", "/x", "--out", "/tmp/x"])
    assert (args.arch, args.epochs, args.batch_size, args.lr, args.optimizer, args.wd, args.warmup_epochs,
            args.tau, args.proj_hidden, args.pred_hidden, args.dim, args.crop_size, args.blur) == \
        ("resnet50", 1000, 4096, 0.2, "lars", 1.5e-6, 10, 0.996, 4096, 4096, 256, 224, True)


def test_recipe_runs_on_cifar10_loss_falls_no_collapse(tmp_path):
    torch.manual_seed(0)
    n, dim = 6, 64
    res = recipe.main(["--max-steps", str(n), "--batch-size", "8", "--no-knn", "--out", str(tmp_path),
                       "--workers", "0", "--data-backend", "torch", "--crop-size", "16", "--proj-hidden", "256",
                       "--pred-hidden", "256", "--dim", str(dim), "--lr", "4.0", "--log-every", "1",
                       "--epochs", "1"])
    assert res["step"] == n and (tmp_path / "backbone.pth").exists()
    recs = log_records(tmp_path)
    losses = [r["loss"] for r in recs]
    assert len(losses) == n and all(math.isfinite(v) for v in losses)
    # the predictor and encoder learn to predict the target's projection of the other view
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # collapse indicator: per-dimension std of the L2-normalized projections stays near 1/sqrt(d)
    # (a collapsed network gives 0); tiny batches / short runs sit a little below 1/sqrt(d)
    z_std = [r["z_std"] for r in recs]
    assert min(z_std[-3:]) > 0.3 / math.sqrt(dim), z_std
