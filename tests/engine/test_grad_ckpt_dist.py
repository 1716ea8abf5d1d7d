"""``--grad-ckpt`` under torchrun (2 gloo processes): a tiny DINO ViT (drop-path in the student, EMA teacher,
per-parameter clip hook, multi-crop) trained with checkpointing equals the plain DDP run -- bit-identical under DDP,
within ZeRO's tolerance (as tests/engine/test_zero.py) under ZeRO-2 -- in losses, student, teacher and center; and a
ZeRO-2 + checkpointing run cut mid-epoch and resumed in a fresh launch continues the same curve bit-exactly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastcl.engine.distributed import shutdown_distributed
from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import init_distributed

REPO = Path(__file__).resolve().parents[2]
STEPS, CUT = 6, 3  # 2 epochs x 3 batches of 8 (4 per rank)


class Loader:
    """Fixed multi-crop batches (2 x 16 px + 2 x 8 px), interleaved rank shards of one global batch per step."""

    def __init__(self, batch_size, rank, world_size, n=24):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.bs, self.rank, self.world, self.epoch, self.start = batch_size, rank, world_size, 0, 0

    def __len__(self):
        return len(self.x) // (self.bs * self.world)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(self.start, len(self)):
            idx = perm[i * self.bs * self.world:(i + 1) * self.bs * self.world][self.rank::self.world]
            x = self.x[idx]
            views = [x, x.flip(3), x[..., :8, :8].contiguous(), x[..., 8:, 8:].contiguous()]
            yield views, torch.zeros(len(idx), dtype=torch.long), idx


def _dino():
    from fastcl.methods.dino import DINO
    from fastcl.models import build_backbone

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    student, d = build_backbone("vit_tiny_patch16_224", drop_path_rate=0.2, **kw)
    teacher, _ = build_backbone("vit_tiny_patch16_224", **kw)
    return DINO(student, d, teacher_backbone=teacher, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                warmup_teacher_temp_epochs=0, freeze_last_layer=0, clip_grad=0.5)


def _worker(phase: str, out: Path) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size

    def train(name, **kw):
        torch.manual_seed(100 + rank)  # per-rank init and RNG, as cli.run: the engine syncs rank 0's weights
        losses = []
        cfg = TrainConfig(**{**dict(out_dir=str(out / name), epochs=2, batch_size=8, optimizer="adamw", lr=1e-3,
                                    weight_decay=0.04, weight_decay_end=0.1, clip_grad=1.0, log_every=1, amp="none",
                                    resume="none"), **kw})
        t = Trainer(_dino(), Loader(cfg.batch_size // world, rank, world), cfg, info,
                    log_fn=lambda r: losses.append(r["loss"]))
        t.fit()
        return {"state": {k: v.detach().clone() for k, v in t.method.state_dict().items()}, "losses": losses,
                "ckpt_modules": t.grad_ckpt_modules, "step": t.step}

    res = {}
    if phase == "train":
        res["ddp"] = train("ddp")
        res["ddp_ckpt"] = train("ddp_ckpt", grad_ckpt=True)
        res["zero2_ckpt"] = train("zero2_ckpt", grad_ckpt=True, zero_stage=2)
        res["zero2_ckpt_cut"] = train("zero2_ckpt_cut", grad_ckpt=True, zero_stage=2, max_steps=CUT, ckpt_every=2)
    else:  # a fresh launch resumes the cut run
        res["resumed"] = train("zero2_ckpt_cut", grad_ckpt=True, zero_stage=2, resume="auto")
    if rank == 0:
        torch.save(res, out / f"{phase}.pt")
    shutdown_distributed()


def _launch(phase: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, phase, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{phase} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_ckpt_dist")
    return _launch("train", out), _launch("resume", out)


@pytest.mark.slow
def test_ddp_and_zero2_with_grad_ckpt_equal_plain_ddp(runs):
    r, _ = runs
    assert r["ddp"]["ckpt_modules"] == [] and r["zero2_ckpt"]["ckpt_modules"] == [
        f"student_backbone.blocks.{i}" for i in range(3)]
    assert len(r["ddp"]["losses"]) == STEPS
    assert r["ddp_ckpt"]["losses"] == r["ddp"]["losses"]  # bit-identical: same ops, same drop-path masks
    for k, v in r["ddp"]["state"].items():
        assert torch.equal(r["ddp_ckpt"]["state"][k], v), k
    assert r["zero2_ckpt"]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-5, abs=1e-7)
    for k, v in r["ddp"]["state"].items():  # student, EMA teacher, center
        torch.testing.assert_close(r["zero2_ckpt"]["state"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    teacher = [k for k in r["ddp"]["state"] if k.startswith("teacher_backbone.blocks")]
    assert teacher and any(not torch.equal(r["ddp"]["state"][k], r["ddp"]["state"][k.replace("teacher", "student")])
                           for k in teacher)  # (the teacher moved by EMA, behind the student)


@pytest.mark.slow
def test_zero2_with_grad_ckpt_resumes_bit_exactly(runs):
    r, res = runs
    cut, resumed, full = r["zero2_ckpt_cut"], res["resumed"], r["zero2_ckpt"]
    assert cut["step"] == CUT and resumed["step"] == STEPS
    assert cut["losses"] + resumed["losses"] == full["losses"]
    for k, v in full["state"].items():
        assert torch.equal(resumed["state"][k], v), k


if __name__ == "__main__":  # one torchrun worker: python -m torch.distributed.run ... test_grad_ckpt_dist.py PHASE OUT
    _worker(sys.argv[1], Path(sys.argv[2]))
