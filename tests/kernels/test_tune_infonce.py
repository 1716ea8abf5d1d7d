"""benchmarks/tune_infonce.py's check half on CPU: every candidate tile of every InfoNCE kernel gives the shipped
tile's result (the GPU run adds the timing)."""
import importlib.util
import json
from pathlib import Path

import pytest

from fastcl.kernels.utils import interpreting

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not interpreting(), reason="the CPU smoke runs the kernels in the Triton interpreter")
def test_tune_smoke_every_tile_agrees_with_the_shipped_one(tmp_path):
    spec = importlib.util.spec_from_file_location("tune_infonce", ROOT / "benchmarks" / "tune_infonce.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    out = tmp_path / "t.json"
    assert tune.main(["--smoke", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {c[0] for c in tune.SMOKE_CASES}
    assert "dk" not in cases["moco_fp32_c32"] and "dk" in cases["inbatch_fp16_c64"]
    for r in cases.values():
        for k in ("fwd", "dq", "dk"):
            if k in r:
                rows = r[k]["all"]
                assert len(rows) == 2 and all(x.get("ok") for x in rows), rows  # both tiles ran and agree
