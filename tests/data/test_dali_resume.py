"""Bit-exact resume on the DALI back end (issue 10, item 3): the augmentation's random state travels in the
training checkpoint (DALI checkpointing), so a run cut anywhere -- mid-epoch, at an epoch's end -- and resumed by a
fresh loader yields the views, and so the losses and weights, of the uninterrupted run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("nvidia.dali")
from fastcl.data import augment  # noqa: E402
from fastcl.data.dali import DaliLoader  # noqa: E402
from fastcl.engine import TrainConfig, Trainer  # noqa: E402
from fastcl.engine.distributed import DistInfo  # noqa: E402
from fastcl.methods import Method  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """22 textured JPEGs in 2 classes (gradients + noise: every crop, flip and jitter shows in the pixels)."""
    root = tmp_path_factory.mktemp("resume_folder")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:48]
    for k in range(22):
        d = root / f"c{k % 2}"
        d.mkdir(exist_ok=True)
        base = np.stack([x * 5 + 7 * k, y * 6 + 3 * k, (x + y) * 2 + 11 * k], -1)
        img = (base + rng.integers(0, 40, base.shape)) % 256
        Image.fromarray(img.astype(np.uint8)).save(d / f"{k:02d}.jpg", quality=95)
    return root


SPECS = {"two-view": augment.mocov2_aug_plus(size=16),
         "multi-crop": augment.multicrop(global_size=16, local_size=8, n_local=2)}


def _views(dl, epoch, start=0, take=None):
    dl.set_epoch(epoch, start)
    out, it = [], iter(dl)
    for _ in range((len(dl) - start) if take is None else take):
        views, _, idx = next(it)
        out.append((views, idx))
    return out


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))
                                    for (va, ia), (vb, ib) in zip(a, b))


@pytest.mark.parametrize("cut", [(0, 2), (1, 0)], ids=["mid-epoch", "epoch-end"])
@pytest.mark.parametrize("decode", ["once", "fused"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_a_fresh_loader_given_the_state_yields_the_uninterrupted_views(folder, spec, decode, cut):
    make = lambda: DaliLoader(folder, SPECS[spec], 2, rank=1, world_size=2, seed=3, decode=decode)  # noqa: E731
    full = make()
    ref = _views(full, 0) + _views(full, 1) + _views(full, 2)
    epoch, batch = cut
    cut_run = make()
    head = sum((_views(cut_run, e) for e in range(epoch)), [])
    head += _views(cut_run, epoch, take=batch) if batch else []
    state = cut_run.state_dict()
    resumed = make()  # a new process: nothing shared with cut_run but the state
    resumed.load_state_dict(state)
    tail = _views(resumed, epoch, batch) + sum((_views(resumed, e) for e in range(epoch + 1, 3)), [])
    assert _equal(head + tail, ref)  # bit-exact views, epochs after the resumed one included
    # without the state the resumed loader gets the right samples but other views (what resume did before)
    plain = make()
    other = _views(plain, epoch, batch)
    assert [i.tolist() for _, i in other] == [i.tolist() for _, i in ref[len(head):len(head) + len(other)]]
    assert not _equal(other, ref[len(head):len(head) + len(other)])


def test_a_foreign_state_is_refused_with_a_warning_and_the_stream_restarts(folder):
    dl = DaliLoader(folder, SPECS["two-view"], 4)
    _views(dl, 0, take=1)
    state = dl.state_dict()
    other = DaliLoader(folder, SPECS["two-view"], 2)
    with pytest.warns(RuntimeWarning, match="batch 4 on cpu, this loader has batch 2"):
        other.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="holds no DALI state"):
        other.load_state_dict(None)
    fresh = DaliLoader(folder, SPECS["two-view"], 2)
    assert _equal(_views(other, 0), _views(fresh, 0))


class PooledRegression(Method):
    """A linear map from one view's pooled pixels onto the other's: the loss depends on every view's pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.backbone = nn.Linear(3 * 4 * 4, 3 * 4 * 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, views, step):
        self.seen.append(torch.stack([v.detach().clone() for v in views]))
        a, b = (F.adaptive_avg_pool2d(v, 4).flatten(1) for v in views)
        return {"loss": F.mse_loss(self.backbone(a), b)}


def _train(out, folder, max_steps, ckpt_every):
    loader = DaliLoader(folder, SPECS["two-view"], 4, seed=5)  # 5 batches per epoch
    cfg = TrainConfig(out_dir=str(out), epochs=3, batch_size=4, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                      max_steps=max_steps, amp="none", log_every=1, ckpt_every=ckpt_every)
    log = []
    method = PooledRegression()
    trainer = Trainer(method, loader, cfg, CPU, log_fn=log.append)
    trainer.fit()
    return log, method


@pytest.mark.parametrize("stop", [7, 10], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_dali_run_continues_the_uninterrupted_one_bit_exactly(tmp_path, folder, stop):
    full_log, full = _train(tmp_path / "full", folder, 13, ckpt_every=3)
    first_log, _ = _train(tmp_path / "cut", folder, stop, ckpt_every=3)  # checkpoint written on the way out
    torch.manual_seed(123)  # a fresh process would not share any state
    second_log, second = _train(tmp_path / "cut", folder, 13, ckpt_every=3)
    assert [r["step"] for r in second_log] == list(range(stop + 1, 14))
    assert all(torch.equal(a, b) for a, b in zip(full.seen[stop:], second.seen))  # the same views ...
    assert [r["loss"] for r in first_log + second_log] == [r["loss"] for r in full_log]  # ... and losses
    for pa, pb in zip(full.state_dict().values(), second.state_dict().values()):
        assert torch.equal(pa, pb)
