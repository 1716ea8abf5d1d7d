"""SimCLR v1/v2: NT-Xent vs the paper's formula (with and without the v2 memory), heads, momentum encoder,
fine-tuning head, and short runs of both recipes on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcl.methods.base import Step
from fastcl.methods.simclr import SimCLR
from recipe_loader import load_recipe

def log_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())


def ntxent_literal(z, n, tau, extra_negatives=()):
    """Eq. (1) of the paper, one anchor at a time: z is the list of 2N vectors, pairs (k, k+N)."""
    def sim(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        den += sum(math.exp(sim(z[i], q) / tau) for q in extra_negatives)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / den)
    return total / (2 * n)


@pytest.mark.parametrize("n, dim", [(6, 8), (5, 3)])  # weird shapes: odd batch, tiny dim
def test_ntxent_matches_paper_formula_float64(n, dim):
    torch.manual_seed(0)
    m = SimCLR(tiny_net(), 16, dim=dim, T=0.5)
    z1, z2 = torch.randn(n, dim, dtype=torch.float64), torch.randn(n, dim, dtype=torch.float64)
    ref = ntxent_literal(list(torch.cat([z1, z2])), n, 0.5)
    assert float(m.loss(z1, z2)) == pytest.approx(ref, rel=1e-5)  # the loss core runs in fp32
    queue = F.normalize(torch.randn(7, dim, dtype=torch.float64), dim=1)
    ref_q = ntxent_literal(list(torch.cat([z1, z2])), n, 0.5, extra_negatives=list(queue))
    assert float(m.loss(z1, z2, queue)) == pytest.approx(ref_q, rel=1e-5)


def test_forward_is_one_pass_over_both_views_and_heads_are_the_papers():
    torch.manual_seed(0)
    m = SimCLR(tiny_net(), 16, dim=8, T=0.1)
    lin = [x for x in m.projector.net if isinstance(x, nn.Linear)]
    assert [x.out_features for x in lin] == [16, 8]  # v1: feat -> feat -> 128 (here 16 -> 16 -> 8)
    assert isinstance(m.projector.net[-1], nn.BatchNorm1d)
    x1, x2 = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    loss = m([x1, x2], Step(0, 0, 1, 1, {}))["loss"]
    z = m.projector(m.backbone(torch.cat([x1, x2])))
    torch.testing.assert_close(loss, m.loss(z[:4], z[4:]))
    loss.backward()
    out_bn = m.projector.net[-1]
    assert out_bn.bias.grad is None and torch.all(out_bn.bias == 0)  # scale-only output BN
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    v2 = SimCLR(tiny_net(), 16, dim=8, hidden_dim=32, proj_layers=3)
    assert [x.out_features for x in v2.projector.net if isinstance(x, nn.Linear)] == [32, 32, 8]
    head = v2.finetune_head()  # backbone + first projection layer (Linear, BN, ReLU)
    assert [type(x) for x in head[1:]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert head(torch.randn(4, 3, 4, 4)).shape == (4, 32)
    with pytest.raises(ValueError, match="-1"):
        SimCLR(tiny_net(), 16, T=-1)


def test_v2_memory_encoder_moves_only_by_ema_and_fills_queue():
    torch.manual_seed(0)
    m = SimCLR(tiny_net(), 16, dim=8, proj_layers=3, queue_size=12, m=0.99)
    assert set(m.schedules(2, 3)) == {"momentum"} and np.all(m.schedules(2, 3)["momentum"] == 0.99)
    x = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    m([x[0], x[1]], Step(0, 0, 1, 1, {"momentum": 0.9}))["loss"].backward()
    assert all(p.grad is None for p in m.backbone_k.parameters())
    k_before = [p.detach().clone() for p in m.backbone_k.parameters()]
    with torch.no_grad():
        for p in m.backbone.parameters():
            p -= 0.5 * p.grad
    keys = m._keys_to_enqueue.clone()
    m.after_optimizer_step(Step(0, 0, 1, 1, {"momentum": 0.9}))
    for pk, k0, pq in zip(m.backbone_k.parameters(), k_before, m.backbone.parameters()):
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * pq)
    torch.testing.assert_close(m.queue.queue[:8], F.normalize(keys.float(), dim=1))  # both views' keys (2N), normalized
    assert int(m.queue.ptr) == 8


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
def test_simclr_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    n = 12
    res = run_recipe("simclr_r50", tmp_path, n, ["--optimizer", "adamw", "--lr", "0.02", "--wd", "0",
                                                 "--hidden-dim", "64", "--dim", "32"])  # LARS barely moves in 12 steps
    losses = log_losses(tmp_path)
    assert res["step"] == n and len(losses) == n and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.slow
def test_simclrv2_recipe_with_memory_runs_and_exports_finetune_head(tmp_path):
    res = run_recipe("simclrv2_r50", tmp_path, 3, ["--queue-size", "32", "--hidden-dim", "64", "--dim", "32"])
    losses = log_losses(tmp_path)
    assert res["step"] == 3 and all(math.isfinite(v) for v in losses)
    head = torch.load(tmp_path / "finetune_head.pth")["finetune_head"]
    assert any(k.startswith("1.") for k in head)  # the first projection layer is exported with the backbone


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, path):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 4 * world, 8, dtype=torch.float64).unbind(0)  # the global batch, same on all ranks
    n = 4
    mine = [z[rank * n:(rank + 1) * n].clone().requires_grad_() for z in (z1, z2)]
    m = SimCLR(tiny_net(), 16, dim=8, T=0.5)
    loss = m.loss(*mine)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": mine[0].grad, "g2": mine[1].grad}, f"{path}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_negatives_gathered_with_gradient_match_one_process(tmp_path):
    """2 ranks x 4 pairs == one process with 8 pairs: same mean loss, and each rank's grads (summed over
    ranks by the differentiable all-gather) / world == the one-process grads of its rows (DDP averages)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    z1, z2 = (z.clone().requires_grad_() for z in torch.randn(2, 8, 8, dtype=torch.float64).unbind(0))
    loss = SimCLR(tiny_net(), 16, dim=8, T=0.5).loss(z1, z2)
    loss.backward()
    r = [torch.load(tmp_path / f"r.{i}") for i in range(2)]
    assert float((r[0]["loss"] + r[1]["loss"]) / 2) == pytest.approx(loss.item(), rel=1e-6)
    for i in range(2):
        torch.testing.assert_close(r[i]["g1"] / 2, z1.grad[4 * i:4 * i + 4], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r[i]["g2"] / 2, z2.grad[4 * i:4 * i + 4], rtol=1e-5, atol=1e-7)
