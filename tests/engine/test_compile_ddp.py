"""``--compile`` under DDP (two gloo processes): the methods whose forward runs a collective -- MoCo's shuffle BN
(gathers the batch and rank 0's permutation), SimCLR's negatives (a gather that gradients flow back through),
SwAV's distributed Sinkhorn, DINO's center (all-reduce) -- compile into one graph, collectives included, and
train as eager does, in float64 so that no ReLU flips on a last-bit difference.

What used to go wrong (torch 2.14 and 2.11 alike): ``torch.distributed.nn.functional.all_gather`` raises under
torch.compile, so SimCLR's whole forward silently ran eager (with a warning); ``dist.broadcast`` split MoCo's
forward into 4 graphs. The only graph breaks left are DDP's own (its forward wrapper and its logger), by design.

Two gloo processes per launch via ``python -m torch.distributed.run`` on this file (``__main__`` below).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import init_distributed, shutdown_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_compile import METHODS, Views  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DDP_METHODS = ["mocov2", "simclr", "swav", "dino"]


def _worker(out: Path) -> None:
    from torch._dynamo.utils import counters

    torch.set_default_dtype(torch.float64)
    torch._inductor.config.fallback_random = True  # eager's random streams (MoCo's shuffle)
    info = init_distributed("cpu")
    res = {}
    for name in DDP_METHODS:
        build, sizes = METHODS[name]
        for mode in ("none", "default"):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            method = build()
            cfg = TrainConfig(out_dir=str(out / f"{name}_{mode}"), epochs=1, batch_size=16, lr=0.05,
                              weight_decay=1e-4, log_every=1, resume="none", knn_every=0, amp="none", compile=mode)
            losses = []
            torch.manual_seed(1 + info.rank)  # per-rank data order and random streams
            Trainer(method, Views(sizes), cfg, info, log_fn=lambda r: losses.append(r["loss"])).fit()
            res[(name, mode)] = {"losses": losses, "state": {k: v.detach().clone()
                                                             for k, v in method.state_dict().items()},
                                 "breaks": list(counters["graph_break"]),
                                 "graphs": counters["stats"]["unique_graphs"]}
    if info.rank == 0:
        torch.save(res, out / "res.pt")
    shutdown_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / "res.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_METHODS)
def test_ddp_compiled_step_is_one_graph_equal_to_eager(runs, name):
    eager, comp = runs[(name, "none")], runs[(name, "default")]
    # DDP's forward wrapper is skipped by dynamo by design (it compiles the module inside); nothing else may break
    foreign = [b.splitlines()[0] + " | " + next((l for l in b.splitlines() if "context" in l), "")
               for b in comp["breaks"] if "DistributedDataParallel" not in b and "Logger" not in b]
    assert foreign == [], f"{name}: graph breaks inside the method under DDP: {foreign}"
    assert comp["graphs"] == 1, f"{name}: the DDP step compiled into {comp['graphs']} graphs, not 1"
    assert len(comp["losses"]) == 3 and comp["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    for k, v in eager["state"].items():
        torch.testing.assert_close(comp["state"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {k}: {m}")


if __name__ == "__main__":  # one torchrun worker: python -m torch.distributed.run ... test_compile_ddp.py OUT
    _worker(Path(sys.argv[1]))
