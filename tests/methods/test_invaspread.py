"""InvaSpread: the instance-spread loss vs the paper's formula (official-code form), one shared encoder
over both views, key detachment, and a short run of the recipe on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcl.methods.base import Step
from fastcl.methods.invaspread import InvaSpread, invaspread_loss
from recipe_loader import load_recipe

def log_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def spread_literal(x, tau):
    """J = -1/(2m) Σ_a [log P(a⁺|a) + Σ_{k≠a,a⁺} log(1 - P(k|a))], P(k|a) = e^{x_a·x_k/τ} / Σ_{l≠a} e^{x_a·x_l/τ}."""
    two_m = len(x)
    total = 0.0
    for a in range(two_m):
        pos = (a + two_m // 2) % two_m
        den = sum(math.exp(float(x[a] @ x[l]) / tau) for l in range(two_m) if l != a)
        P = {k: math.exp(float(x[a] @ x[k]) / tau) / den for k in range(two_m) if k != a}
        total += math.log(P[pos]) + sum(math.log(1 - P[k]) for k in P if k != pos)
    return -total / two_m


@pytest.mark.parametrize("m, dim, tau", [(8, 16, 0.1), (3, 5, 0.5)])  # weird shapes: tiny batch, odd dim
def test_loss_matches_paper_formula_float64(m, dim, tau):
    torch.manual_seed(0)
    x = F.normalize(torch.randn(2 * m, dim, dtype=torch.float64), dim=1)
    assert float(invaspread_loss(x, tau)) == pytest.approx(spread_literal(list(x), tau), rel=1e-10)
    # DDP layout: this rank's block inside gathered keys; other ranks' rows are extra negatives
    other = F.normalize(torch.randn(2 * m, dim, dtype=torch.float64), dim=1)
    got = invaspread_loss(x, tau, torch.cat([other, x]), offset=2 * m)
    assert math.isfinite(float(got)) and float(got) > float(invaspread_loss(x, tau))
    with pytest.raises(ValueError, match="even"):
        invaspread_loss(x[:-1], tau)


def test_one_shared_encoder_detached_keys_and_gradients():
    torch.manual_seed(0)
    m = InvaSpread(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16)), 16, dim=8)
    x1, x2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    loss = m([x1, x2], Step(0, 0, 1, 1, {}))["loss"]
    z = F.normalize(m.projector(m.backbone(torch.cat([x1, x2]))), dim=1)  # one pass, BN over both views
    torch.testing.assert_close(loss, invaspread_loss(z, 0.1, z.detach()))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    # detached keys: the gradient of x_a comes from its anchor row only (official BatchCriterion)
    x = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1).requires_grad_()
    invaspread_loss(x, 0.1, x.detach()).backward()
    g_detached = x.grad.clone()
    x.grad = None
    invaspread_loss(x, 0.1, x).backward()
    assert not torch.allclose(g_detached, x.grad)
    with pytest.raises(ValueError, match="0"):
        InvaSpread(nn.Identity(), 4, T=0)


@pytest.mark.slow
def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    n = 12
    try:
        torch.manual_seed(0)
        recipe = load_recipe("invaspread_r18")
        res = recipe.main(
            ["--max-steps", str(n), "--batch-size", "16", "--no-knn", "--out", str(tmp_path), "--workers", "0",
             "--data-backend", "torch", "--crop-size", "8", "--log-every", "1", "--train-samples", "16",
             "--epochs", str(n), "--lr", "4", "--lr-schedule", "cos"])  # one fixed batch of 16 images, repeated
    finally:
        torch.set_num_threads(threads)
    losses = log_losses(tmp_path)
    assert res["step"] == n and len(losses) == n and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    s = recipe.step_lr(0.06, 200, 10)
    assert s[1199] == pytest.approx(0.06) and s[1200] == pytest.approx(0.006) and s[-1] == pytest.approx(0.006)
