"""Tar shards under a real 2-process gloo group (issue 12 item 2): each rank builds its training loader through
``fastcl.data.build.build_train_loader`` from its own process (torch.multiprocessing spawn, ``init_distributed``),
and per epoch the ranks' sample indices, gathered with ``all_gather_object``, are disjoint and together every kept
sample exactly once -- on the torchvision back end (``ShardLoader``, 2 DataLoader workers per rank) and on DALI
(``DaliShardLoader``). Each rank's indices also equal what a loader built for that rank in this process yields (the
plan does not depend on anything but seed, epoch, rank and world size)."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from fastcl.engine.distributed import shutdown_distributed
from fastcl.data import augment
from fastcl.data import build as data_build
from fastcl.data.shards import write_shards

N, GLOBAL_BATCH, EPOCHS = 41, 6, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("ddp_src")
    rng = np.random.default_rng(0)
    for k in range(N):
        d = src / f"c{k % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{k:02d}.png")
    pattern, n, _ = write_shards(src, tmp_path_factory.mktemp("ddp_shards"), 8, labels=True)
    return pattern


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loader(pattern, backend, dist_info):
    return data_build.build_train_loader(pattern, augment.mocov2_aug_plus(size=8), backend, dist_info,
                                         batch_size=GLOBAL_BATCH, workers=2, seed=11)


def _rank_main(rank, world, port, pattern, backend, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from fastcl.engine.distributed import init_distributed

    info = init_distributed("cpu")
    loader = _loader(pattern, backend, info)
    epochs = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        mine = [(idx.tolist(), labels.tolist()) for _, labels, idx in loader]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": info.rank, "len": len(loader), "batches": mine})
        epochs.append(gathered)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"type": type(loader).__name__, "epochs": epochs}, f)
    dist.barrier()
    shutdown_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_two_gloo_ranks_read_every_kept_sample_exactly_once(shards, backend, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "epochs.json"
    mp.start_processes(_rank_main, args=(2, _free_port(), shards, backend, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    res = json.loads(out.read_text())
    assert res["type"] == {"torch": "ShardLoader", "dali": "DaliShardLoader"}[backend]
    from fastcl.data.shards import ShardIndex
    from fastcl.engine.distributed import DistInfo

    index = ShardIndex(shards)
    labels = {int(index.starts[s]) + r: row[3] for s, rows in enumerate(index.shards) for r, row in enumerate(rows)}
    per_rank = GLOBAL_BATCH // 2
    unions = []
    for epoch, gathered in enumerate(res["epochs"]):
        assert [g["rank"] for g in gathered] == [0, 1] and gathered[0]["len"] == gathered[1]["len"] == N // 6
        ranks = [[i for b, _ in g["batches"] for i in b] for g in gathered]
        for g in gathered:
            assert len(g["batches"]) == g["len"] and all(len(b) == per_rank for b, _ in g["batches"])
            assert all(lab == [labels[i] for i in b] for b, lab in g["batches"])
        assert not set(ranks[0]) & set(ranks[1])  # disjoint
        union = ranks[0] + ranks[1]
        assert len(union) == len(set(union)) == (N // GLOBAL_BATCH) * GLOBAL_BATCH  # each kept sample once
        assert set(union) <= set(range(N))
        unions.append(union)
        # the same indices a loader built for that rank in this process yields
        for rank, g in enumerate(gathered):
            ref = _loader(shards, backend, DistInfo(rank, 2, rank, torch.device("cpu")))
            ref.set_epoch(epoch)
            assert [b for b, _ in g["batches"]] == [idx.tolist() for _, _, idx in ref]
    assert unions[0] != unions[1]  # reshuffled per epoch
