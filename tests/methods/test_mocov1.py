"""MoCo v1 recipe (MoCo with a linear head, T=0.07, the paper's step lr): loss vs the paper's formula,
key encoder moves only by EMA, queue, lr schedule, and a short run on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcl.methods.base import Step
from fastcl.methods.moco import MoCo
from recipe_loader import load_recipe

recipe = load_recipe("mocov1_r50")


def log_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_moco(K=32, dim=8):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())  # no BN: shuffling is a no-op
    return MoCo(net, 16, dim=dim, K=K, m=0.999, T=0.07, mlp=False, bn_splits=1)  # MoCo v1: linear head


def step(m=0.999, lr=0.1):
    return Step(0, 0, 1, 1, {"momentum": m, "lr": lr})


def test_loss_matches_paper_formula_float64():
    moco = tiny_moco().double()
    assert isinstance(moco.projector, nn.Linear)  # v1: linear head, no MLP
    im_q, im_k = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    loss = moco([im_q, im_k], step())["loss"]
    # literal transcription of Algorithm 1: q = f_q(x_q), k = f_k(x_k) (normalized), l_pos = q.k,
    # l_neg = q.queue^T, logits = [l_pos, l_neg] / T, CE with label 0
    with torch.no_grad():
        q = moco.projector(moco.backbone(im_q))
        k = moco.projector_k(moco.backbone_k(im_k))
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    queue = moco.queue.queue
    total = 0.0
    for i in range(6):
        l_pos = float(q[i] @ k[i])
        l_neg = [float(q[i] @ queue[j]) for j in range(queue.shape[0])]
        logits = [l_pos / 0.07] + [v / 0.07 for v in l_neg]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    # the loss core computes in fp32 (keys are cast to fp32 in MoCo._keys): fp32 tolerance
    assert float(loss) == pytest.approx(total / 6, rel=1e-5)


def test_key_encoder_moves_only_by_ema_and_queue_gets_keys():
    moco = tiny_moco(K=12)
    assert all(not p.requires_grad for p in [*moco.backbone_k.parameters(), *moco.projector_k.parameters()])
    x = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    out = moco(x, step())
    out["loss"].backward()
    assert all(p.grad is None for p in moco.backbone_k.parameters())
    q_before = [p.detach().clone() for p in moco.backbone.parameters()]
    k_before = [p.detach().clone() for p in moco.backbone_k.parameters()]
    with torch.no_grad():
        for p in moco.backbone.parameters():
            p -= 0.5 * p.grad  # an optimizer step on the query encoder only
    keys = moco._keys_to_enqueue.clone()
    moco.after_optimizer_step(step(m=0.9))
    for pk, k0, q0, q1 in zip(moco.backbone_k.parameters(), k_before, q_before, moco.backbone.parameters()):
        assert not torch.equal(q0, q1)
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * q1)  # exactly the scheduled EMA
    torch.testing.assert_close(moco.queue.queue[:4], F.normalize(keys, dim=1))
    assert int(moco.queue.ptr) == 4


def test_step_lr_schedule_is_the_papers():
    s = recipe.step_lr(0.03, 200, 10)
    assert len(s) == 2000
    assert s[0] == s[1199] == pytest.approx(0.03)  # epochs 0-119
    assert s[1200] == pytest.approx(0.003) and s[1599] == pytest.approx(0.003)  # epochs 120-159
    assert s[1600] == pytest.approx(0.0003) and s[-1] == pytest.approx(0.0003)
    args = recipe.cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, ["--data", "/x", "--out", "/tmp/x"])
    assert (args.arch, args.queue_size, args.moco_t, args.moco_m, args.lr, args.wd, args.epochs) == \
        ("resnet50", 65536, 0.07, 0.999, 0.03, 1e-4, 200)
    args.arch = "resnet18_cifar"
    m = recipe.build_method(args)
    np.testing.assert_allclose(m.lr_schedule(200, 10), s)


@pytest.mark.slow
def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        n = 16
        res = recipe.main(["--max-steps", str(n), "--batch-size", "16", "--no-knn", "--out", str(tmp_path),
                           "--workers", "0", "--data-backend", "torch", "--arch", "resnet18_cifar",
                           "--crop-size", "8", "--queue-size", "32", "--bn-splits", "2", "--lr", "2",
                           "--lr-schedule", "cos", "--log-every", "1", "--epochs", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == n
    losses = log_losses(tmp_path)
    assert len(losses) == n and all(math.isfinite(v) for v in losses)
    # the first 2 steps run against the random initial queue (low loss); compare once it holds real keys
    early, late = np.mean(losses[2:6]), np.mean(losses[-4:])
    assert late < early, (early, late, losses)
    assert (tmp_path / "backbone.pth").exists()
