"""Multi-node launch (issue 12 item 3): two torchrun "nodes" on this machine (``--nnodes 2``, one process each,
c10d rendezvous on 127.0.0.1, gloo) train exactly as one node with two processes: the same losses and learning
rates at every step in log.jsonl and bit-identical trained weights. The README's multi-node commands are the ones
launched here (c10d rendezvous, and the static one with --node-rank), with the endpoint on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "mocov2_r50.py"
TINY = ["--train-samples", "64", "--batch-size", "16", "--max-steps", "3", "--no-knn", "--workers", "0",
        "--data-backend", "torch", "--device", "cpu", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_records(out: Path) -> list[tuple]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r["lr"], r["loss"]) for r in recs if "loss" in r]


def _check(r, what):
    assert r.returncode == 0, f"{what} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: 1 node x 2 processes."""
    out = tmp_path_factory.mktemp("one_node")
    r = subprocess.run([*TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", "2", str(RECIPE), *TINY,
                        "--out", str(out)], cwd=out, env=ENV, capture_output=True, text=True, timeout=600)
    _check(r, "1 node x 2 processes")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_two_nodes_train_as_one_node_with_two_processes(one_node, tmp_path, rdzv):
    """c10d: the README's command (node ranks given out at the rendezvous; torchrun ignores --node-rank there);
    static: --node-rank with --master-addr / --master-port."""
    two = tmp_path / "two_nodes"
    port = _free_port()
    if rdzv == "c10d":
        launch = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastcl-test"]
    else:
        launch = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), *launch,
                               str(RECIPE), *TINY, "--out", str(two)],
                              cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for rank, (p, (stdout, stderr)) in enumerate(zip(nodes, outs)):
        _check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), f"node {rank} of 2")
    banners = [o for o, _ in outs if "process(es)" in o]
    assert len(banners) == 1 and "2 process(es) on cpu" in banners[0]  # one run of world size 2, not two runs

    a, b = _train_records(one_node), _train_records(two)
    assert [s for s, *_ in a] == [1, 2, 3]
    assert a == b  # every step's epoch, lr and loss, bit for bit
    wa = torch.load(one_node / "backbone.pth", weights_only=False)["backbone"]
    wb = torch.load(two / "backbone.pth", weights_only=False)["backbone"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = torch.load(one_node / "checkpoint.pth", weights_only=False)
    cb = torch.load(two / "checkpoint.pth", weights_only=False)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])  # queue and momentum encoder too
