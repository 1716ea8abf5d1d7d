"""Host overhead of the engine: an "empty" step (a 4x4 linear layer on 2 samples, SGD with momentum) through the
real ``Trainer`` against a hand-written loop of the same math (zero_grad, backward, step), in the same run.

    pytest benchmarks/bench_overhead.py -s            # CUDA when there is one, else the CPU
    FASTCL_BENCH_CPU=1 pytest benchmarks/bench_overhead.py -s

On such a step the device work is nil, so the time per step is what the host spends: Python, dispatch and
kernel launches. The Trainer adds what a real run needs -- schedules written into the optimizer, the data /
forward / backward / optimizer / EMA NVTX ranges, the progress bar, one loss copy per step for the non-finite
check (read at log steps only) -- and checkpoints and logs only at the end here (``log_every`` = the run).
Each side runs ``STEPS`` steps ``REPEATS`` times, alternating; the medians are compared. The issue's goal is
at most 1.1x the hand loop; the pytest assertion only checks that the run completed (timing goals are not
tests). With ``$FASTCL_BENCH_JSON`` set, the numbers are appended there.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
import torch.nn as nn

from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.methods.base import Method

STEPS = int(os.environ.get("FASTCL_OVERHEAD_STEPS", "2000"))
REPEATS = 5
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("FASTCL_BENCH_CPU") != "1" else "cpu")


class _Loader:
    """The same two-sample batch every step, already on the device (no data cost on either side)."""

    def __init__(self):
        self.x = torch.randn(2, 4, device=DEVICE)
        self.y, self.i = torch.zeros(2, dtype=torch.long), torch.arange(2)

    def __len__(self):
        return STEPS

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __iter__(self):
        for _ in range(STEPS):
            yield [self.x, self.x], self.y, self.i


class _Empty(Method):
    decay_bias_and_norm = True  # one param group, as the hand loop's optimizer

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)

    def forward(self, views, step):
        return {"loss": self.backbone(views[0]).sum()}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _fastcl(tmp_path, k) -> float:
    cfg = TrainConfig(out_dir=str(tmp_path / f"run{k}"), epochs=1, batch_size=2, optimizer="sgd", lr=0.1,
                      weight_decay=1e-4, log_every=STEPS, knn_every=0, resume="none", amp="none", compile="none")
    t = Trainer(_Empty().to(DEVICE), _Loader(), cfg, DistInfo(0, 1, 0, DEVICE))
    t.save = lambda *a, **kw: None  # the end-of-run checkpoint is not a step
    _sync()
    t0 = time.perf_counter()
    t.fit()
    _sync()
    return (time.perf_counter() - t0) / STEPS


def _hand() -> float:
    model = nn.Linear(4, 4).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _sync()
    t0 = time.perf_counter()
    for views, _, _ in _Loader():
        loss = model(views[0]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync()
    return (time.perf_counter() - t0) / STEPS


def test_empty_step_overhead_against_a_hand_loop(tmp_path):
    _hand(), _fastcl(tmp_path, "warm")  # (first-call costs: allocator, lazy imports)
    hand, engine = [], []
    for k in range(REPEATS):
        hand.append(_hand())
        engine.append(_fastcl(tmp_path, k))
    h, f = statistics.median(hand), statistics.median(engine)
    print(f"\nempty step on {DEVICE.type} ({STEPS} steps x {REPEATS}, medians): hand loop {h * 1e6:.1f} us, "
          f"fastcl Trainer {f * 1e6:.1f} us -> {f / h:.2f}x (goal <= 1.1x)")
    path = os.environ.get("FASTCL_BENCH_JSON")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"bench": "empty_step_overhead", "device": DEVICE.type, "hand_us": h * 1e6,
                                 "fastcl_us": f * 1e6, "ratio": f / h, "steps": STEPS, "repeats": REPEATS}) + "\n")
    assert h > 0 and f > 0
