"""What a crash, a full disk or a second run on the same --out leave behind: one run per folder (a dead run's lock
taken over), no orphaned temp checkpoints, a full disk refused naming the folder and the bytes with the previous
checkpoint kept, and logs cut back to the checkpoint a run resumes from."""
import errno
import json
import os
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from fastcl.engine import checkpoint as ckpt_mod
from fastcl.engine.checkpoint import claim_out_dir, save_atomic

from test_engine import _train  # noqa: E402  (tests/engine is on sys.path under pytest's rootdir)


def _hold_lock(out):
    """A separate process that claims ``out`` and sleeps (as a running training would)."""
    code = ("import sys, time; from fastcl.engine.checkpoint import claim_out_dir; "
            "l = claim_out_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"another run \(pid {holder.pid}\) is using --out {tmp_path}"):
            _train(tmp_path, 2, [])
        assert not (tmp_path / "log.jsonl").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up code runs
        holder.wait()
    log = []
    _train(tmp_path, 2, log)  # the dead run's lock does not stand in the way
    assert [r["step"] for r in log] == [1, 2]
    claim_out_dir(tmp_path).release()  # and the finished run released its own


def test_orphaned_temp_checkpoints_are_removed_when_a_run_starts(tmp_path):
    orphan = tmp_path / ".checkpoint.pth.tmp12345"  # left by a kill during a write
    orphan.write_bytes(b"x" * 1000)
    _train(tmp_path, 1, [])
    assert not orphan.exists() and (tmp_path / "checkpoint.pth").exists()


def test_out_at_a_file_or_an_impossible_path_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*f is a file, not a folder"):
        claim_out_dir(tmp_path / "f")
    with pytest.raises(ValueError, match=r"--out .*f/sub: cannot write there"):
        claim_out_dir(tmp_path / "f" / "sub")


Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_is_refused_before_writing_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.ones(10)}, path)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path}: the checkpoint needs about 5 MiB,"
                                      r" 0 MiB are free; the previous checkpoint.pth is kept") as e:
        save_atomic({"w": torch.zeros(1 << 20)}, path)  # 4 MiB of tensors
    assert e.value.errno == errno.ENOSPC
    assert torch.equal(torch.load(path)["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_write_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """The space ran out during the write (torch.save's own message is "basic_ios::clear: iostream error")."""
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.ones(10)}, path)
    free = iter([10**12, 10])  # enough before the write, gone after it

    def torn_save(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 61952384 vs 61952280")

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**12, 0, next(free)))
    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="no space left on the device of"):
        save_atomic({"w": torch.zeros(10)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # the partial temp file is gone


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    """A run killed after step 6 with its last checkpoint at step 4: the resumed run logs 5.. again, once."""
    _train(tmp_path, 6, [], ckpt_every=4)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    ckpt["position"] = {"epoch": 0, "batch": 4, "step": 4}  # as if the kill came after step 6, before its save
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')  # a line torn by the kill
    _train(tmp_path, 8, [], ckpt_every=4)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.skipif(sys.platform != "linux", reason="fcntl locks, /proc")
def test_the_lock_file_names_the_holder(tmp_path):
    lock = claim_out_dir(tmp_path)
    try:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        lock.release()
