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
