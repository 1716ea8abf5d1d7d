"""InstDisc: NCE + proximal term vs the paper's formula, Z estimated once, the memory bank update
(momentum 0.5, only the batch's rows), the step lr, and a short run of the recipe on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.instdisc import InstDisc, nce_loss
from recipe_loader import load_recipe

def log_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def nce_literal(v_rows, f, n, tau, Z, lam):
    """Eq. (6)-(8) + Sec. 3.4 of the paper for one batch; v_rows[i][0] is v_i, the rest noise samples."""
    total = 0.0
    for i in range(len(f)):
        m = len(v_rows[i]) - 1
        P = [math.exp(float(v @ f[i]) / tau) / Z for v in v_rows[i]]
        h = [p / (p + m / n) for p in P]
        total += -(math.log(h[0]) - lam * float(((f[i] - v_rows[i][0]) ** 2).sum()))
        total += -sum(math.log(1 - hj) for hj in h[1:])
    return total / len(f)


def tiny(n=50, K=7, lam=30.0, T=0.07):
    torch.manual_seed(0)
    return InstDisc(nn.Sequential(nn.Flatten(), nn.Linear(12, 16)), 16, n, dim=8, K=K, T=T, prox_lambda=lam)


@pytest.mark.parametrize("n, K, B", [(50, 7, 6), (13, 1, 3)])  # weird shapes: tiny bank, one noise sample
def test_loss_matches_paper_formula_float64(n, K, B):
    m = tiny(n, K, lam=30.0)
    x, idx = torch.randn(B, 3, 2, 2), torch.randperm(n)[:B]
    torch.manual_seed(123)
    out = m([x], Step(0, 0, 1, 1, {}, indices=idx))
    torch.manual_seed(123)  # replay the noise draw of the forward
    sample = torch.randint(0, n, (B, K + 1))
    sample[:, 0] = idx
    with torch.no_grad():
        f = m.projector(m.backbone(x)).double()
        f = f / f.norm(dim=1, keepdim=True)
    mem = m.memory.double()
    Z = n * float(torch.stack([torch.exp(mem[sample[i]] @ f[i] / 0.07) for i in range(B)]).mean())
    assert float(m.Z) == pytest.approx(Z, rel=1e-5)  # Z = n * mean(exp(v.f/T)) over the first batch
    ref = nce_literal([mem[sample[i]] for i in range(B)], f, n, 0.07, Z, 30.0)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-4)  # fp32 model vs float64 transcription
    s = torch.randn(B, K + 1, dtype=torch.float64) * 5
    lit = nce_literal([torch.eye(K + 1, dtype=torch.float64)] * B, [r * 1.0 for r in s * 0.07], n, 0.07, 3.0, 0)
    assert float(nce_loss(s, torch.tensor(3.0, dtype=torch.float64), n)) == pytest.approx(lit, rel=1e-9)


def test_bank_update_z_fixed_and_gradients():
    m = tiny(n=20, K=5)
    assert m.needs_indices
    idx = torch.tensor([3, 7, 11, 0])
    x = torch.randn(4, 3, 2, 2)
    out = m([x], Step(0, 0, 1, 1, {}, indices=idx))
    z0 = float(m.Z)
    out["loss"].backward()
    assert m.memory.grad is None and m.projector.weight.grad is not None and m.backbone[1].weight.grad is not None
    mem0 = m.memory.clone()
    f = m._to_write[0].clone()
    m.after_optimizer_step(Step(0, 0, 1, 1, {}, indices=idx))
    expect = 0.5 * mem0[idx] + 0.5 * f
    torch.testing.assert_close(m.memory[idx], expect / expect.norm(dim=1, keepdim=True))
    rest = torch.ones(20, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(m.memory[rest], mem0[rest])  # other slots untouched
    m([torch.randn(4, 3, 2, 2)], Step(1, 0, 1, 1, {}, indices=torch.tensor([1, 2, 4, 5])))
    assert float(m.Z) == z0  # estimated once
    with pytest.raises(ValueError, match="indices"):
        m([x], Step(0, 0, 1, 1, {}))
    with pytest.raises(ValueError, match="-0.5"):
        InstDisc(nn.Linear(2, 2), 2, 10, bank_momentum=-0.5)


def test_recipe_preset_and_step_lr():
    recipe = load_recipe("instdisc_r50")
    args = recipe.cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, ["--out", "/tmp/x"])
    assert (args.nce_t, args.nce_k, args.bank_momentum, args.prox_lambda, args.lr_schedule) == (0.1, 4096, 0.5, 30.0,
                                                                                               "step")
    s = recipe.step_lr(0.03, 200, 10)
    assert s[1199] == pytest.approx(0.03) and s[1200] == pytest.approx(0.003) and s[1600] == pytest.approx(3e-4)


@pytest.mark.slow
def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    n = 12
    try:
        torch.manual_seed(0)
        res = load_recipe("instdisc_r50").main(
            ["--max-steps", str(n), "--batch-size", "16", "--no-knn", "--out", str(tmp_path), "--workers", "0",
             "--data-backend", "torch", "--crop-size", "8", "--log-every", "1", "--train-samples", "32",
             "--epochs", str(n), "--nce-k", "64", "--lr", "2", "--lr-schedule", "cos"])
    finally:
        torch.set_num_threads(threads)
    losses = log_losses(tmp_path)
    assert res["step"] == n and len(losses) == n and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, path):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    m = tiny(n=20, K=5)  # same seed: the same bank and weights on both ranks
    idx = torch.tensor([[3, 7, 11], [0, 5, 19]])[rank]
    torch.manual_seed(100 + rank)
    m([torch.randn(3, 3, 2, 2)], Step(0, 0, 1, 1, {}, indices=idx))["loss"].backward()
    f = m._to_write[0].clone()
    m.after_optimizer_step(Step(0, 0, 1, 1, {}, indices=idx))
    torch.save({"memory": m.memory, "Z": m.Z, "f": f, "idx": idx}, f"{path}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_bank_update_gathers_features_and_indices(tmp_path):
    """Every rank writes every rank's rows (lightly#1018: features gathered but not indices corrupts the bank)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, start_method="spawn")
    r = [torch.load(tmp_path / f"r.{i}") for i in range(2)]
    assert torch.equal(r[0]["memory"], r[1]["memory"]) and float(r[0]["Z"]) == float(r[1]["Z"]) > 0
    mem0 = tiny(n=20, K=5).memory
    for i in range(2):
        expect = 0.5 * mem0[r[i]["idx"]] + 0.5 * r[i]["f"]
        torch.testing.assert_close(r[0]["memory"][r[i]["idx"]], expect / expect.norm(dim=1, keepdim=True))
    untouched = [j for j in range(20) if j not in (3, 7, 11, 0, 5, 19)]
    assert torch.equal(r[0]["memory"][untouched], mem0[untouched])
