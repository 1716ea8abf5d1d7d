"""MoCo v3: the symmetric 2τ·InfoNCE vs the paper's formula, frozen patch projection, momentum encoder
moving only by the cosine-scheduled EMA, heads, and short runs of both recipes on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.mocov3 import MoCoV3, vit_init_
from fastcl.models import build_backbone
from recipe_loader import load_recipe

def log_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_vit():
    net, d = build_backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=2, num_heads=3)
    return vit_init_(net), d


def ctr_literal(q, k, tau):
    """Algorithm 1 of the paper: logits = mm(q, k.t()) / τ on normalized q, k; CE(logits, arange(N)) · 2τ."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (k[j] / k[j].norm())) / tau for j in range(k.shape[0])]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return 2 * tau * total / n


@pytest.mark.parametrize("n, dim, tau", [(8, 16, 0.2), (5, 3, 1.0)])  # weird shapes: odd batch, tiny dim
def test_loss_matches_paper_formula_float64(n, dim, tau):
    torch.manual_seed(0)
    m = MoCoV3(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, dim=dim, mlp_dim=8, T=tau)
    q1, q2, k1, k2 = (torch.randn(n, dim, dtype=torch.float64) for _ in range(4))
    got = m.contrastive(q1, k2) + m.contrastive(q2, k1)
    ref = ctr_literal(q1, k2, tau) + ctr_literal(q2, k1, tau)
    assert float(got) == pytest.approx(ref, rel=1e-5)  # the loss core runs in fp32


def test_forward_heads_and_loss_composition():
    torch.manual_seed(0)
    net, d = build_backbone("resnet18_cifar")
    m = MoCoV3(net, d, dim=16, mlp_dim=32, proj_layers=2, T=1.0)
    assert all(not x.bias is not None for x in m.projector.net if isinstance(x, nn.Linear))  # no biases
    last = m.projector.net[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine  # affine-free output BN
    assert not isinstance(m.predictor.net[-1], nn.BatchNorm1d)  # predictor ends with a Linear
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    loss = m([x1, x2], Step(0, 0, 1, 1, {"momentum": 0.99}))["loss"]
    q1 = m.predictor(m.projector(m.backbone(x1)))
    q2 = m.predictor(m.projector(m.backbone(x2)))
    with torch.no_grad():
        k1, k2 = m.projector_k(m.backbone_k(x1)), m.projector_k(m.backbone_k(x2))
    torch.testing.assert_close(loss, m.contrastive(q1, k2) + m.contrastive(q2, k1))
    with pytest.raises(ValueError, match="m=1.5"):
        MoCoV3(net, d, m=1.5)


def test_patch_projection_frozen_and_momentum_encoder_moves_only_by_scheduled_ema():
    torch.manual_seed(0)
    net, d = tiny_vit()
    assert not net.pos_embed.requires_grad and torch.all(net.pos_embed[0, 0] == 0)
    m = MoCoV3(net, d, dim=8, mlp_dim=16, T=0.2, decay_all=True)
    sched = m.schedules(2, 5)["momentum"]
    assert sched[0] == pytest.approx(0.99) and sched[-1] == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(sched) > 0)  # cosine increase 0.99 -> 1
    proj0 = [p.detach().clone() for p in net.patch_embed.proj.parameters()]
    k0 = [p.detach().clone() for p in m.backbone_k.parameters()]
    opt = torch.optim.AdamW([p for g in m.param_groups(0.1) for p in g["params"]], lr=1e-2, weight_decay=0.1)
    assert sum(len(g["params"]) for g in m.param_groups(0.1)) == len([p for p in m.parameters() if p.requires_grad])
    x = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    m(x, Step(0, 0, 5, 10, {"momentum": sched[3]}))["loss"].backward()
    assert all(p.grad is None for p in net.patch_embed.proj.parameters())
    assert all(p.grad is None for p in [*m.backbone_k.parameters(), *m.projector_k.parameters()])
    assert m.predictor.net[0].weight.grad is not None and net.blocks[0].attn.qkv.weight.grad is not None
    opt.step()
    m.after_optimizer_step(Step(3, 0, 5, 10, {"momentum": sched[3]}))
    for p, p0 in zip(net.patch_embed.proj.parameters(), proj0):
        torch.testing.assert_close(p, p0, rtol=0, atol=0)  # frozen at its random init
    for pk, p0, pq in zip(m.backbone_k.parameters(), k0, m.backbone.parameters()):
        torch.testing.assert_close(pk, sched[3] * p0 + (1 - sched[3]) * pq)


def run_recipe(name, tmp_path, n, extra=()):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        return load_recipe(name).main(
            ["--max-steps", str(n), "--batch-size", "16", "--no-knn", "--out", str(tmp_path), "--workers", "0",
             "--data-backend", "torch", "--crop-size", "8", "--log-every", "1", "--warmup-epochs", "0",
             "--train-samples", "32", "--epochs", str(n), *extra])  # a fixed 32-image subset, 2 steps/epoch
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_r50_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    n = 12
    res = run_recipe("mocov3_r50", tmp_path, n, ["--optimizer", "adamw", "--lr", "0.02", "--wd", "0",
                                                "--mlp-dim", "64", "--dim", "32", "--moco-m", "0.9",
                                                "--moco-m-end", "0.9"])  # LARS barely moves in 12 steps
    losses = log_losses(tmp_path)
    assert res["step"] == n and len(losses) == n and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.slow
def test_vit_recipe_runs_on_cifar10(tmp_path):
    res = run_recipe("mocov3_vits16", tmp_path, 3, ["--arch", "vit_tiny_patch16_224", "--num-heads", "3",
                                                   "--mlp-dim", "64", "--dim", "32"])
    losses = log_losses(tmp_path)
    assert res["step"] == 3 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "backbone.pth").exists()
