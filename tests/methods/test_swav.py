"""SwAV: Sinkhorn-Knopp vs a literal float64 transcription of the paper's Algorithm 1, its marginals and
its all-reduced (multi-rank) form; the swapped-prediction loss vs the paper's formula (float64); the
queue; prototypes normalized and frozen; hyperparameter checks; a short run on real CIFAR-10."""
import json
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastcl.methods import sinkhorn as sk
from fastcl.methods.base import Step
from fastcl.methods.swav import SwAV
from recipe_loader import load_recipe

recipe = load_recipe("swav_r50")


def paper_sinkhorn(scores, eps=0.05, niters=3):
    """Literal float64 transcription of the paper's Algorithm 1 (appendix) sinkhorn()."""
    Q = np.exp(np.asarray(scores, dtype=np.float64) / eps).T
    Q /= np.sum(Q)
    K, B = Q.shape
    u, r, c = np.zeros(K), np.ones(K) / K, np.ones(B) / B
    for _ in range(niters):
        u = np.sum(Q, axis=1)
        Q *= (r / u)[:, None]
        Q *= (c / np.sum(Q, axis=0))[None, :]
    return (Q / np.sum(Q, axis=0, keepdims=True)).T


def cosine_scores(B, K, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("B, K, eps, iters", [(32, 10, 0.05, 3), (5, 37, 0.1, 7)])  # weird shapes: B < K
def test_sinkhorn_matches_paper_algorithm_float64(B, K, eps, iters):
    s = cosine_scores(B, K)
    q = sk.sinkhorn_knopp(s, eps, iters)
    np.testing.assert_allclose(q.numpy(), paper_sinkhorn(s.numpy(), eps, iters), rtol=1e-10, atol=1e-14)


def test_sinkhorn_marginals():
    B, K = 64, 16
    s = cosine_scores(B, K, seed=1)
    q = sk.sinkhorn_knopp(s, 0.05, 3)
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(B), rtol=1e-12)  # each sample: an assignment
    Q = sk.sinkhorn_knopp(s, 0.05, 1000).t() / B  # converged: the transportation polytope
    np.testing.assert_allclose(Q.sum(1).numpy(), np.full(K, 1 / K), rtol=1e-6)  # rows: 1/K
    np.testing.assert_allclose(Q.sum(0).numpy(), np.full(B, 1 / B), rtol=1e-12)  # columns: 1/B
    assert (q >= 0).all()
    # bf16 scores (autocast) are computed in fp32: same codes up to the bf16 rounding of the scores
    q16 = sk.sinkhorn_knopp(s.to(torch.bfloat16), 0.05, 3)
    assert q16.dtype == torch.float32
    np.testing.assert_allclose(q16.double().numpy(), paper_sinkhorn(s.to(torch.bfloat16).double().numpy()),
                               rtol=1e-4, atol=1e-6)


class FakeRanks:
    """Lock-stepped threads standing in for ranks: the collectives sum / concatenate over them."""

    def __init__(self, n):
        self.n, self.barrier, self.slots, self.local = n, threading.Barrier(n), [None] * n, threading.local()

    def _exchange(self, x):
        self.slots[self.local.rank] = x.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def all_reduce_(self, x, op="sum"):
        x.copy_(sum(self._exchange(x)))
        return x

    def all_gather_nograd(self, x):
        return torch.cat(self._exchange(x))


def test_sinkhorn_all_reduced_over_ranks_equals_the_global_batch(monkeypatch):
    B, K, n = 12, 9, 3
    s = cosine_scores(B * n, K, seed=2)
    ref = sk.sinkhorn_knopp(s, 0.05, 3)
    ranks = FakeRanks(n)
    monkeypatch.setattr(sk, "all_reduce_", ranks.all_reduce_)
    monkeypatch.setattr(sk, "all_gather_nograd", ranks.all_gather_nograd)
    monkeypatch.setattr(sk, "get_world_size", lambda: n)
    out = [None] * n

    def rank(r):
        ranks.local.rank = r
        out[r] = sk.sinkhorn_knopp(s[r * B:(r + 1) * B], 0.05, 3)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    torch.testing.assert_close(torch.cat(out), ref, rtol=1e-12, atol=1e-15)


class PoolNet(nn.Module):  # any crop size -> 12 features; no BN, so per-crop == per-size-group passes
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 16), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def tiny_swav(**kw):
    torch.manual_seed(0)
    return SwAV(PoolNet(), 16, **{"hidden": 24, "dim": 8, "n_prototypes": 7, "queue_length": 0, **kw})


def crops(B, dtype=torch.float32):  # 2 global crops (6x6) + 2 local crops (4x4)
    return [torch.randn(B, 3, 6, 6, dtype=dtype) for _ in range(2)] + [torch.randn(B, 3, 4, 4, dtype=dtype)
                                                                        for _ in range(2)]


def literal_swav_loss(m, views, T=0.1, eps=0.05, queue=None):
    """Eq. (3) with multi-crop: for s in {0, 1}, codes q_s = Sinkhorn(z_s^T C) (with the queue's rows
    prepended when given); every other crop v predicts them with p_v = softmax(z_v^T C / T);
    L = mean_s 1/(V-1) sum_{v != s} mean_b [ -sum_k q_s[b,k] log p_v[b,k] ]."""
    B, V = views[0].shape[0], len(views)
    with torch.no_grad():
        z = F.normalize(m.projector(torch.cat([m.backbone(v) for v in views])), dim=1)
        C = m.prototypes.weight.detach()
        scores = (z @ C.t()).numpy()
    total = 0.0
    for i, s in enumerate((0, 1)):
        sc = scores[s * B:(s + 1) * B]
        if queue is not None:
            sc = np.concatenate([(queue[i] @ C.t()).numpy(), sc])
        q = paper_sinkhorn(sc, eps)[-B:]
        sub = 0.0
        for v in range(V):
            if v == s:
                continue
            for b in range(B):
                row = [float(x) / T for x in scores[v * B + b]]
                lse = math.log(sum(math.exp(x) for x in row))
                sub += -sum(q[b, k] * (row[k] - lse) for k in range(len(row))) / B
        total += sub / (V - 1)
    return total / 2


def test_swapped_prediction_loss_matches_paper_formula_float64():
    m = tiny_swav().double()
    views = crops(5, torch.float64)
    loss = m(views, Step(0, 0, 10, 10))["loss"]
    assert float(loss.detach()) == pytest.approx(literal_swav_loss(m, views), rel=1e-9)


def test_queue_starts_fills_and_joins_the_sinkhorn_batch():
    B, spe = 4, 2
    m = tiny_swav(queue_length=8, queue_start_epoch=1).double()
    assert m.queue.shape == (2, 8, 8) and "queue" in m.state_dict()  # a checkpointed buffer
    batches = [crops(B, torch.float64) for _ in range(5)]
    enq = []
    for k, views in enumerate(batches):
        st = Step(k, k // spe, spe, 10)
        used = m._queue_ready(st, B)
        assert used == (k == 4)  # epoch 0 (steps 0-1): no queue; step 2, 3 fill 2x4 rows; step 4 uses it
        queue = m.queue.clone() if used else None
        loss = m(views, st)["loss"]
        assert float(loss.detach()) == pytest.approx(literal_swav_loss(m, views, queue=queue), rel=1e-9)
        if st.epoch >= 1:
            with torch.no_grad():
                z = F.normalize(m.projector(torch.cat([m.backbone(v) for v in views])), dim=1)
            enq.append(torch.stack([z[:B], z[B:2 * B]]))
        else:
            assert m._to_enqueue is None
        m.after_optimizer_step(st)
    torch.testing.assert_close(m.queue, torch.cat([enq[2], enq[1]], dim=1))  # newest first


def test_prototypes_normalized_and_frozen_for_the_first_epoch():
    m = tiny_swav(freeze_prototypes_epochs=1.0, queue_length=0)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(7))
    opt = torch.optim.SGD(m.param_groups(1e-2), lr=0.5, momentum=0.9)
    assert all(g["weight_decay"] == 1e-2 for g in m.param_groups(1e-2))  # decay on every parameter
    spe = 2
    for k in range(4):
        st = Step(k, k // spe, spe, 4 * spe)
        c0, b0 = m.prototypes.weight.detach().clone(), [p.detach().clone() for p in m.projector.parameters()]
        opt.zero_grad()
        m(crops(6), st)["loss"].backward()
        assert m.prototypes.weight.grad is not None
        m.before_optimizer_step(st)
        opt.step()
        m.after_optimizer_step(st)
        assert any(not torch.equal(p, p0) for p, p0 in zip(m.projector.parameters(), b0))
        # epoch 0: untouched (no grad, no decay, no momentum; renormalizing a unit row moves at most an ulp)
        moved = float((m.prototypes.weight.detach() - c0).abs().max()) > 1e-4
        assert moved == (st.epoch >= 1), k
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(7))  # renormalized every step


@pytest.mark.parametrize("kw, bad", [(dict(temperature=0.0), "temperature"), (dict(epsilon=-1.0), "epsilon"),
                                     (dict(n_prototypes=0), "n_prototypes"), (dict(queue_length=-8), "-8"),
                                     (dict(crops_for_assign=()), "crops_for_assign")])
def test_bad_hyperparameters_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        tiny_swav(**kw)
    with pytest.raises(ValueError, match="epsilon"):
        sk.sinkhorn_knopp(torch.zeros(2, 3), epsilon=0.0)


def test_imagenet_preset_is_the_papers():
    args = recipe.cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, ["--data", "/x", "--out", "/tmp/x"])
    assert (args.arch, args.epochs, args.batch_size, args.lr * args.batch_size / 256, args.min_lr, args.optimizer,
            args.wd, args.warmup_epochs, args.n_prototypes, args.temperature, args.epsilon, args.sinkhorn_iters,
            args.queue_length, args.freeze_prototypes_epochs, args.crop_size, args.local_crop_size, args.n_local) == \
        ("resnet50", 800, 4096, 4.8, 0.0048, "lars", 1e-6, 10, 3000, 0.1, 0.05, 3, 0, 1.0, 224, 96, 6)


def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    torch.manual_seed(0)
    n = 8
    res = recipe.main(["--max-steps", str(n), "--batch-size", "8", "--no-knn", "--out", str(tmp_path),
                       "--workers", "0", "--data-backend", "torch", "--crop-size", "16", "--local-crop-size", "8",
                       "--n-local", "2", "--n-prototypes", "32", "--hidden", "128", "--dim", "32",
                       "--queue-length", "0", "--freeze-prototypes-epochs", "0",
                       "--optimizer", "sgd", "--lr", "4.0", "--log-every", "1", "--epochs", "1"])
    assert res["step"] == n and (tmp_path / "backbone.pth").exists()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == n and all(math.isfinite(v) for v in losses)
    # the crops learn to predict each other's codes (the queue is checked against the formula above; in
    # an 8-step run its arrival makes the loss jump, so it is off here)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
