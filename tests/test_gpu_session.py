"""benchmarks/gpu_session.sh's ``tests`` part is the only place the GPU-only tests run (CI has no GPU): every test
file that skips without CUDA must be named there, and everything named there must exist. (The device-resident
augmentation's CUDA test was missing from it until this check.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a skip taken when there is no GPU: skipif(not torch.cuda.is_available() / not cuda / DEV.type != "cuda"), gpu mark
CUDA_SKIP = re.compile(r"skipif\(\s*(not (torch\.cuda\.is_available\(\)|cuda)\b|DEV\.type != \"cuda\")|mark\.gpu\b")


def _tests_part() -> list[str]:
    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    m = re.search(r"^\s*tests\) (.*?);;", text, re.S | re.M)
    assert m, "no 'tests)' part in gpu_session.sh"
    words = shlex.split(m.group(1).replace("\\\n", " "))
    return [w for w in words if w.startswith("tests/")]


def test_every_gpu_only_test_runs_in_the_gpu_session():
    named = _tests_part()
    files = {w.split("::")[0].rstrip("/") for w in named}
    gpu_only = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                      if CUDA_SKIP.search(p.read_text()))
    assert "tests/data/test_gpu_augment.py" in gpu_only and "tests/kernels/test_infonce.py" in gpu_only  # the scan
    missing = [f for f in gpu_only if f not in files and not any(f.startswith(d + "/") for d in files)]
    assert not missing, f"GPU-only tests that gpu_session.sh's tests part never runs: {missing}"
    for w in named:
        path, _, node = w.partition("::")
        assert (ROOT / path).exists(), f"gpu_session.sh names {path}, which does not exist"
        if node:
            assert re.search(rf"^def {re.escape(node)}\(", (ROOT / path).read_text(), re.M), w


def test_a_part_cut_off_by_its_time_limit_does_not_cost_the_picture(tmp_path):
    """A part killed by its time limit leaves an empty --benchmark-json file; the picture step reads the logs
    folder, where such a file is skipped (was: every bench_*.json named, and the first empty one ended the step:
    no bench_ratios.png for the parts that did finish)."""
    import json
    import subprocess
    import sys

    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    m = re.search(r'-m fastcl\.viz bench (\S+)', text)
    assert m and m.group(1) == '"$OUT"/logs', m and m.group(0)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bench_kernels.json").write_text("")  # cut off
    entry = {"name": "test_step", "extra_info": {"hand_ms": 2.0, "eager_ms": 1.0}}
    (logs / "bench_train_step.json").write_text(json.dumps({"benchmarks": [entry]}))
    r = subprocess.run([sys.executable, "-m", "fastcl.viz", "bench", str(logs), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bench_ratios.png").exists()
