"""Tar shards on the DALI back end (issue 12 item 2): ``fn.readers.webdataset`` on DALI's CPU pipeline gives every
kept sample exactly once per epoch over simulated ranks, decodes the pixels the torchvision shard reader decodes,
resumes bit-exactly (DALI checkpointing covers the reader), and finds or writes DALI's index files."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("nvidia.dali")
from fastcl.data import augment  # noqa: E402
from fastcl.data import build as data_build  # noqa: E402
from fastcl.data.augment import AugmentSpec, ViewSpec  # noqa: E402
from fastcl.data.dali import DaliShardLoader  # noqa: E402
from fastcl.data.shards import ShardIndex, ShardLoader, _index_images, dali_index_files, expand, write_shards  # noqa: E402
from fastcl.engine import TrainConfig, Trainer  # noqa: E402
from fastcl.engine.distributed import DistInfo  # noqa: E402
from fastcl.methods import Method  # noqa: E402

NOAUG = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0,
             mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # output = pixel value in [0, 255]
SPEC = augment.mocov2_aug_plus(size=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """41 textured 16x16 images (PNG and JPEG, one grayscale JPEG) in 3 class folders, in 6 shards of 8 (the last
    holds 1): an odd count, and shards that do not divide it."""
    src = tmp_path_factory.mktemp("dsrc")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:16, 0:16]
    for k in range(41):
        d = src / f"c{k % 3}"
        d.mkdir(exist_ok=True)
        img = (np.stack([x * 13 + 5 * k, y * 11 + 3 * k, (x + y) * 7], -1) + rng.integers(0, 30, (16, 16, 3))) % 256
        im = Image.fromarray(img.astype(np.uint8))
        if k == 4:
            im = im.convert("L")
        im.save(d / f"{k:02d}.{'png' if k % 2 else 'jpg'}", **({} if k % 2 else {"quality": 90}))
    out = tmp_path_factory.mktemp("dshards")
    pattern, n, _ = write_shards(src, out, 8, labels=True)
    assert n == 41
    return pattern


def _epoch(dl, epoch, start=0):
    dl.set_epoch(epoch, start)
    return [(views, labels, idx) for views, labels, idx in dl]


@pytest.mark.parametrize("world_size,batch", [(2, 3), (3, 2), (1, 5)])
def test_every_kept_sample_exactly_once_per_epoch_over_ranks(shards, world_size, batch):
    index = ShardIndex(shards)
    labels = {int(index.starts[s]) + r: row[3] for s, rows in enumerate(index.shards) for r, row in enumerate(rows)}
    orders = []
    for epoch in range(3):
        seen = []
        for rank in range(world_size):  # ranks simulated: each builds its loader as under torchrun
            dl = DaliShardLoader(shards, SPEC, batch, rank=rank, world_size=world_size, seed=4, shuffle_buffer=5,
                                 num_threads=1)
            assert len(dl) == 41 // (world_size * batch)
            got = _epoch(dl, epoch)
            assert len(got) == len(dl)
            for views, lab, idx in got:
                assert len(idx) == batch and all(v.shape == (batch, 3, 8, 8) for v in views)
                assert lab.tolist() == [labels[i] for i in idx.tolist()]  # KEY.cls of the sample
            seen.append([i for _, _, idx in got for i in idx.tolist()])
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == len(dl) * batch * world_size  # each kept sample once, ranks disjoint
        assert 41 - len(flat) < world_size * (batch + 1)
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_labels_absent_are_minus_one(tmp_path, shards):
    src = tmp_path / "u"
    src.mkdir()
    for k in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(src / f"{k}.png")
    pattern, _, _ = write_shards(src, tmp_path / "s", 4)
    dl = DaliShardLoader(pattern, SPEC, 3, num_threads=1)
    (_, lab, idx), (_, lab2, idx2) = _epoch(dl, 0)
    assert (torch.cat([lab, lab2]) == -1).all() and sorted(torch.cat([idx, idx2]).tolist()) == list(range(6))


def test_pixels_equal_the_torchvision_shard_reader(shards):
    """No augmentation (the whole 16x16 image, no flip, no jitter, identity normalisation): DALI's decoded pixels
    equal the PIL decode of ShardLoader for every sample, PNGs and JPEGs (colour and grayscale)."""
    view = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), **NOAUG)
    dl = DaliShardLoader(shards, AugmentSpec((view,)), 4, num_threads=1)
    ref = ShardLoader(shards, None, 1, num_workers=0, shuffle_buffer=1)
    handles, n = {}, 0
    for (v,), _, idx in _epoch(dl, 0):
        for img, i in zip(v, idx.tolist()):
            pil = np.asarray(ref._load(handles, i, *ref._locate(i))[0], np.float32)
            assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(pil)), i
            n += 1
    assert n == 40


def _views_equal(a, b):
    return len(a) == len(b) and all(
        torch.equal(ia, ib) and torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb))
        for (va, la, ia), (vb, lb, ib) in zip(a, b))


@pytest.mark.parametrize("spec", [SPEC, augment.multicrop(global_size=8, local_size=4, n_local=2)],
                         ids=["two-view", "multi-crop"])
def test_resume_is_bit_exact(shards, spec):
    make = lambda: DaliShardLoader(shards, spec, 3, rank=1, world_size=2, seed=3, shuffle_buffer=6,  # noqa: E731
                                   num_threads=1)
    full = make()
    ref = [_epoch(full, e) for e in range(3)]
    # an epoch depends on (seed, epoch, rank, world size, batch) only: a fresh loader at epoch 2 = the third epoch
    assert _views_equal(_epoch(make(), 2), ref[2])
    # mid-epoch with the state the engine saves: DALI's checkpoint of the reader and the random operators
    cut = make()
    cut.set_epoch(1)
    it = iter(cut)
    head = [next(it) for _ in range(2)]
    state = cut.state_dict()
    assert state["pipeline"] is not None and (state["epoch"], state["batch"]) == (1, 2)
    resumed = make()
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no replay
        tail = _epoch(resumed, 1, 2)
    assert _views_equal(head + tail, ref[1]) and _views_equal(_epoch(resumed, 2), ref[2])
    # without a state: the epoch's first batches are decoded again, with the same result (and a warning)
    with pytest.warns(RuntimeWarning, match="running the epoch's first 2 batches again"):
        assert _views_equal(_epoch(make(), 1, 2), ref[1][2:])
    # an iteration abandoned at batch 2 and resumed there continues the same pipeline
    it2 = iter(cut)
    del it2
    assert _views_equal(_epoch(cut, 1, 2), ref[1][2:])


def test_a_foreign_state_warns_and_the_epoch_is_replayed(shards):
    dl = DaliShardLoader(shards, SPEC, 4, num_threads=1)
    dl.set_epoch(0)
    it = iter(dl)
    next(it)
    other = DaliShardLoader(shards, SPEC, 2, num_threads=1)
    with pytest.warns(RuntimeWarning, match="no DALI state for these shards"):
        other.load_state_dict(dl.state_dict())
    with pytest.warns(RuntimeWarning, match="no DALI state for these shards"):
        other.load_state_dict({"backend": "dali", "pipeline": b""})  # a folder DaliLoader's


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


def _train(out, shards, max_steps):
    loader = DaliShardLoader(shards, SPEC, 4, seed=5, num_threads=1)  # 10 batches per epoch
    cfg = TrainConfig(out_dir=str(out), epochs=3, batch_size=4, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                      max_steps=max_steps, amp="none", log_every=1, ckpt_every=4)
    log, method = [], PooledRegression()
    Trainer(method, loader, cfg, DistInfo(0, 1, 0, torch.device("cpu")), log_fn=log.append).fit()
    return log, method


@pytest.mark.parametrize("stop", [7, 10], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_on_dali_shards_continues_the_uninterrupted_one_bit_exactly(tmp_path, shards, stop):
    full_log, full = _train(tmp_path / "full", shards, 14)
    first_log, _ = _train(tmp_path / "cut", shards, stop)  # checkpoint written on the way out
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DaliShardLoader: (no DALI state|the saved DALI state)")  # (resumed
        second_log, second = _train(tmp_path / "cut", shards, 14)  # from the state, not replayed)
    assert [r["step"] for r in second_log] == list(range(stop + 1, 15))
    assert all(torch.equal(a, b) for a, b in zip(full.seen[stop:], second.seen))
    assert [r["loss"] for r in first_log + second_log] == [r["loss"] for r in full_log]


# ============ DALI's index files ============

def test_index_files_match_dalis_wds2idx(shards, tmp_path):
    """write_shards leaves ``shard-NNNNNN.idx`` next to each shard; its image components are those DALI's own
    ``wds2idx`` finds, and the loader uses them as they are."""
    paths = expand(shards)
    assert dali_index_files(ShardIndex(shards)) == [p[:-4] + ".idx" for p in paths]
    tool = shutil.which("wds2idx")
    if tool is None:
        pytest.skip("DALI's wds2idx tool not on PATH")
    for p in paths:
        subprocess.run([tool, p, str(tmp_path / "ref.idx")], check=True, capture_output=True)
        ref = _index_images((tmp_path / "ref.idx").read_text())
        assert ref and _index_images(open(p[:-4] + ".idx").read()) == ref


def test_read_only_shard_folder_and_foreign_index_use_the_cache(shards, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    shutil.copytree(os.path.dirname(expand(shards)[0]), ro)
    for f in ro.glob("*.idx"):
        f.unlink()
    (ro / "shard-000001.idx").write_text("v1.2 1\njpg 512 10 x.jpg\n")  # another version's index: left alone
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: refuse as the file system would
            import fastcl.data.shards as shards_mod

            real = shards_mod._write_atomic

            def refuse(path, text):
                if Path(path).parent == ro:
                    raise PermissionError(13, "Permission denied")
                real(path, text)

            monkeypatch.setattr(shards_mod, "_write_atomic", refuse)
        pattern = str(ro / os.path.basename(shards))
        dl = DaliShardLoader(pattern, SPEC, 4, num_threads=1, index_cache=str(tmp_path / "cache"))
        assert all(p.startswith(str(tmp_path / "cache")) for p in dl.index_paths)
        assert sorted(i for _, _, idx in _epoch(dl, 0) for i in idx.tolist()) == \
            sorted(i for _, _, idx in _epoch(DaliShardLoader(shards, SPEC, 4, num_threads=1), 0) for i in idx.tolist())
    finally:
        os.chmod(ro, stat.S_IRWXU)
    assert (ro / "shard-000001.idx").read_text() == "v1.2 1\njpg 512 10 x.jpg\n"


def test_foreign_index_next_to_writable_shards_is_not_overwritten(shards, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(os.path.dirname(expand(shards)[0]), d)
    (d / "shard-000002.idx").write_text("stale")
    (d / "shard-000003.idx").unlink()
    pattern = str(d / os.path.basename(shards))
    paths = dali_index_files(ShardIndex(pattern), tmp_path / "cache")
    assert paths[2].startswith(str(tmp_path / "cache")) and paths[3] == str(d / "shard-000003.idx")
    assert (d / "shard-000002.idx").read_text() == "stale" and (d / "shard-000003.idx").exists()


def test_auto_keeps_shards_on_torchvision_and_dali_reads_them_when_asked(shards):
    """auto: torchvision, which substitutes an undecodable sample (DALI's shard reader stops the run at one)."""
    cpu = torch.device("cpu")
    assert data_build.resolve_backend(shards, "auto", cpu) == "torch"
    assert data_build.resolve_backend(shards, "dali", cpu) == "dali"
    dist = DistInfo(0, 1, 0, cpu)
    loader = data_build.build_train_loader(shards, SPEC, "dali", dist, batch_size=4, workers=1)
    assert isinstance(loader, DaliShardLoader) and len(loader) == 10
    from types import SimpleNamespace as NS

    from fastcl import cli

    trainer = NS(device=cpu, amp_dtype=None, knn_loaders=None, compile_mode="none", steps_per_epoch=10)
    line = cli.resolved_line(NS(no_knn=True, knn_samples=0, workers=1, lr=0.03, grad_ckpt=False),
                             NS(batch_size=4, lr=0.03, min_lr=0.0), loader, trainer)
    assert "data back end dali (tar shards) (1 workers)" in line


def test_a_sample_the_header_check_passes_but_dali_cannot_decode_is_one_error_line(tmp_path, capsys):
    """A JPEG with valid start and end markers and garbage between passes the header check: DALI's decoder stops
    the epoch and the CLI prints one error line (the reader picked the sample: not named)."""
    from fastcl.cli import main_guard

    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(src / f"{k}.png")
    (src / "2.png").unlink()
    (src / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2 + b"\xff\xd9")
    pattern, _, _ = write_shards(src, tmp_path / "s", 3)
    dl = DaliShardLoader(pattern, SPEC, 6, num_threads=1)
    with pytest.raises(SystemExit) as exc:
        main_guard(lambda: list(dl))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --data {pattern}: DALI cannot decode a sample of the shards (") and \
        err.endswith("its header passed the check; --data-backend torch substitutes undecodable samples and "
                     "lists them")


# ============ undecodable samples: header check at index time, substituted ============

@pytest.fixture(scope="module")
def dirty_shards(tmp_path_factory):
    """20 labeled 16x16 images in 4 shards (6, 6, 6, 2), two of them undecodable: a text file named ``.jpg``
    (shard 0) and a JPEG cut to half its bytes (shard 2). Returns (pattern, {bad index: "shard.tar:KEY"})."""
    src = tmp_path_factory.mktemp("dirty_src")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:16, 0:16]
    for k in range(20):
        d = src / f"c{k % 2}"
        d.mkdir(exist_ok=True)
        img = (np.stack([x * 13 + 9 * k, y * 11 + 5 * k, (x + y) * 7], -1) + rng.integers(0, 30, (16, 16, 3))) % 256
        Image.fromarray(img.astype(np.uint8)).save(d / f"{k:02d}.{'png' if k % 3 == 0 else 'jpg'}", **({} if k % 3 == 0 else {"quality": 90}))
    (src / "c0" / "02.jpg").write_text("this is text, not a JPEG\n")  # sample 1 (c0 sorted first): shard 0
    jpg = (src / "c1" / "13.jpg").read_bytes()  # sample 10 + 6 = 16: shard 2
    (src / "c1" / "13.jpg").write_bytes(jpg[:len(jpg) // 2])
    out = tmp_path_factory.mktemp("dirty_shards")
    pattern, n, _ = write_shards(src, out, 6, labels=True)
    paths = expand(pattern)
    bad = {1: f"{paths[0]}:000000001", 16: f"{paths[2]}:000000016"}
    assert n == 20 and len(bad) == 2
    return pattern, bad


def test_undecodable_samples_are_substituted_named_and_every_good_sample_read_once(dirty_shards):
    """The text-as-JPEG and the truncated JPEG are flagged from their header bytes when the loader is built (one
    warning each, on rank 0), named ``shard.tar:KEY`` as ``ShardLoader`` names them, and never decoded: their slots
    get the next good sample of their shard (its pixels and label, their own index), so every good sample appears
    exactly once per epoch over the ranks and the epochs keep their length."""
    pattern, bad = dirty_shards
    index = ShardIndex(pattern)
    rows = {int(index.starts[s]) + r: (s, r, row) for s, rs in enumerate(index.shards) for r, row in enumerate(rs)}
    view = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), **NOAUG)
    with pytest.warns(RuntimeWarning, match="DaliShardLoader: cannot decode") as rec:
        DaliShardLoader(pattern, AugmentSpec((view,)), 3, num_threads=1)
    assert sorted(str(w.message).split(" (")[0].split("decode ")[1] for w in rec
                  if "cannot decode" in str(w.message)) == sorted(bad.values())
    ref = ShardLoader(pattern, None, 1, num_workers=0, shuffle_buffer=1)
    handles = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = {i: np.asarray(ref._load(handles, i, *ref._locate(i))[0], np.float32) for i in rows}
    for f in handles.values():
        f.close()
    assert sorted(ref.bad_files) == sorted(bad.values())  # (the torchvision reader found the same two, decoding)
    for world_size, batch in [(2, 3), (1, 4)]:
        for epoch in range(2):
            seen = []
            for rank in range(world_size):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dl = DaliShardLoader(pattern, AugmentSpec((view,)), batch, rank=rank, world_size=world_size,
                                         seed=2, shuffle_buffer=4, num_threads=1)
                assert dl.bad_file_report() == {"bad_files": sorted(bad.values()), "skipped_files": []}
                assert len(dl) == 20 // (world_size * batch)
                got = _epoch(dl, epoch)
                assert len(got) == len(dl)
                for (v,), lab, idx in got:
                    for img, label, i in zip(v, lab.tolist(), idx.tolist()):
                        s, r, row = rows[i]
                        if i in bad:  # the next good sample of its shard
                            j = next(int(index.starts[s]) + (r + k) % len(index.shards[s])
                                     for k in range(1, len(index.shards[s]))
                                     if int(index.starts[s]) + (r + k) % len(index.shards[s]) not in bad)
                        else:
                            j = i
                        assert label == rows[j][2][3]
                        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(pixels[j])), (i, j)
                seen += [i for _, _, idx in got for i in idx.tolist()]
            assert len(seen) == len(set(seen)) == len(dl) * batch * world_size
            assert 20 - len(seen) < world_size * (batch + 1)
    # (every good sample once per epoch: with one rank and a batch dividing the set, none is left out)
    dl = DaliShardLoader(pattern, SPEC, 5, num_threads=1, shuffle_buffer=4)
    for epoch in range(2):
        assert sorted(i for _, _, idx in _epoch(dl, epoch) for i in idx.tolist()) == list(range(20))


def test_substituted_shards_keep_their_own_index_file(dirty_shards, tmp_path):
    """The substituting index is DALI's format, written in the cache: the shard's own ``.idx`` is left as it is."""
    pattern, bad = dirty_shards
    before = {p: open(p[:-4] + ".idx").read() for p in expand(pattern)}
    with pytest.warns(RuntimeWarning):
        dl = DaliShardLoader(pattern, SPEC, 4, num_threads=1, index_cache=str(tmp_path / "cache"))
    flagged = {name.rsplit(":", 1)[0] for name in bad.values()}
    for p, idx in zip(expand(pattern), dl.index_paths):
        assert open(p[:-4] + ".idx").read() == before[p]
        assert idx.startswith(str(tmp_path / "cache")) == (p in flagged)
        assert _index_images(open(idx).read()) is not None


def test_a_shard_of_undecodable_samples_only_is_not_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(8):
        Image.fromarray(np.full((8, 8, 3), 30 * k, np.uint8)).save(src / f"{k}.png")
    for k in (6, 7):
        (src / f"{k}.png").write_bytes(b"no")
    pattern, _, _ = write_shards(src, tmp_path / "s", 3)  # shards of 3, 3, 2: the last all bad
    with pytest.warns(RuntimeWarning, match="cannot decode"):
        dl = DaliShardLoader(pattern, SPEC, 2, num_threads=1)
    assert len(dl) == 3 and len(dl.bad_file_report()["bad_files"]) == 2
    assert sorted(i for _, _, idx in _epoch(dl, 0) for i in idx.tolist()) == list(range(6))
    for k in range(6):
        (src / f"{k}.png").write_bytes(b"no")
    pattern, _, _ = write_shards(src, tmp_path / "t", 3)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no decodable image in the shards"):
        DaliShardLoader(pattern, SPEC, 2, num_threads=1)


@pytest.mark.parametrize("stop", [7, 10], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_over_undecodable_samples_continues_bit_exactly(tmp_path, dirty_shards, stop):
    """Training over the two bad samples (5 batches of 4 per epoch) does not stop, and a run cut at step ``stop``
    and resumed from its checkpoint sees the views and losses of the uninterrupted one."""
    pattern, _ = dirty_shards
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DaliShardLoader: cannot decode")
        full_log, full = _train(tmp_path / "full", pattern, 14)
        first_log, _ = _train(tmp_path / "cut", pattern, stop)
        warnings.filterwarnings("error", message="DaliShardLoader: (no DALI state|the saved DALI state)")
        second_log, second = _train(tmp_path / "cut", pattern, 14)
    assert len(full_log) == 14 and [r["step"] for r in second_log] == list(range(stop + 1, 15))
    assert all(torch.equal(a, b) for a, b in zip(full.seen[stop:], second.seen))
    assert [r["loss"] for r in first_log + second_log] == [r["loss"] for r in full_log]
