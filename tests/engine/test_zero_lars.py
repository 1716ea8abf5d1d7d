"""LARS under DeepSpeed ZeRO 1/2: the trust ratio eta * ||w|| / ||g|| of each parameter, computed from the flat
shards (norms summed per parameter fragment and all-reduced over the ranks), gives the non-ZeRO LARS update.

One process: LARS on a flat concatenation of parameters, tagged with segment ids, equals LARS on the parameters.
Two gloo processes (torchrun on this file): ZeRO-1 and ZeRO-2 training with LARS (decayed + lars_exclude groups,
a per-parameter gradient hook, global clip, EMA teacher) equal DDP with LARS, which differs from SGD and from a
trust ratio taken over each rank's shard (the naive way)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_zero import Loader, Toy, _cfg, _close, _differs, _launch as _zero_launch  # noqa: E402

from fastcl.engine.distributed import shutdown_distributed
from fastcl.engine import Trainer  # noqa: E402
from fastcl.engine.distributed import init_distributed  # noqa: E402
from fastcl.engine.optim import LARS  # noqa: E402


def test_lars_on_a_tagged_flat_shard_equals_lars_on_the_parameters():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 2, 3), (5,)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    gs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ref = [p.clone().requires_grad_(False) for p in ps]
    opt_ref = LARS([{"params": ref, "weight_decay": 0.01}], lr=2.0, momentum=0.9)
    flat = torch.cat([p.flatten() for p in ps] + [torch.zeros(3)])  # + padding, as DeepSpeed aligns
    opt = LARS([{"params": [flat], "weight_decay": 0.01}], lr=2.0, momentum=0.9)
    seg = torch.cat([torch.full((p.numel(),), j) for j, p in enumerate(ps)] + [torch.full((3,), len(ps))])
    opt.zero_segments[id(flat)] = (seg, len(ps))
    for step_grads in gs:
        for p, gr in zip(ref, step_grads):
            p.grad = gr.clone()
        flat.grad = torch.cat([gr.flatten() for gr in step_grads] + [torch.zeros(3)])
        opt_ref.step()
        opt.step()
    torch.testing.assert_close(flat[:-3], torch.cat([p.flatten() for p in ref]), rtol=1e-6, atol=1e-7)
    assert torch.equal(flat[-3:], torch.zeros(3))
    # the trust ratio matters here: one ratio for the whole flat tensor (no tags) would give another result
    naive = torch.cat([p.flatten() for p in ps] + [torch.zeros(3)])
    opt_naive = LARS([{"params": [naive], "weight_decay": 0.01}], lr=2.0, momentum=0.9)
    for step_grads in gs:
        naive.grad = torch.cat([gr.flatten() for gr in step_grads] + [torch.zeros(3)])
        opt_naive.step()
    assert not torch.allclose(naive, flat, rtol=1e-3, atol=1e-4)


def _worker(phase: str, out: Path) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    lars = dict(optimizer="lars", lr=40.0, weight_decay=1e-3, weight_decay_end=1e-3)  # LARS steps eta * lr = 0.04

    def train(name, **kw):
        torch.manual_seed(100 + rank)
        losses = []
        cfg = _cfg(out / name, **{**lars, **kw})
        t = Trainer(Toy(), Loader(cfg.batch_size // world, rank, world), cfg, info,
                    log_fn=lambda r: losses.append(r["loss"]))
        if name == "zero2_naive":  # the naive way: each rank's shard as if it were one parameter
            real = t.zero.zero_optimizer.optimizer
            real.zero_segments = {k: (torch.zeros_like(s), 1) for k, (s, n) in real.zero_segments.items()}
        t.fit()
        return {"state": {k: v.detach().clone() for k, v in t.method.state_dict().items()}, "losses": losses}

    res = {"ddp": train("ddp"), "zero1": train("zero1", zero_stage=1), "zero2": train("zero2", zero_stage=2),
           "ddp_sgd": train("ddp_sgd", optimizer="sgd", lr=0.5), "zero2_naive": train("zero2_naive", zero_stage=2)}
    if rank == 0:
        torch.save(res, out / f"{phase}.pt")
    shutdown_distributed()


@pytest.mark.slow
def test_zero1_and_zero2_lars_equal_ddp_lars(tmp_path, monkeypatch):
    import test_zero

    monkeypatch.setattr(test_zero, "__file__", __file__)  # launch this file's worker with test_zero's launcher
    r = _zero_launch("lars", tmp_path)
    assert len(r["ddp"]["losses"]) == 12
    assert _differs(r["ddp"]["state"], r["ddp_sgd"]["state"])
    assert _differs(r["zero2_naive"]["state"], r["ddp"]["state"])  # per-shard norms would train something else
    for name in ("zero1", "zero2"):
        _close(r[name]["state"], r["ddp"]["state"], rtol=1e-5, atol=1e-6)
        assert r[name]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-5, abs=1e-7)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
