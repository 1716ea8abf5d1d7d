"""Time every InfoNCE kernel (forward, dq, dk) over candidate tiles on the GPU, one kernel at a time.

    python benchmarks/tune_infonce.py --out tune_infonce.json --budget 120     # on a GPU: ~2 min
    TRITON_INTERPRET=1 python benchmarks/tune_infonce.py --smoke               # CPU: checks only, no timing

``kernels/infonce.py::_settings`` picks a tile per kernel from ptxas's register/spill counts (aot_check) with
no GPU to time them on. This script is the other half: for the shapes the benchmarks use (MoCo's queue: N=256,
K=65,536, C=128; MoCo v3's in-batch loss: N=M=4096, C=256) and wider rows, it runs each kernel alone
(``infonce_forward`` for "fwd", ``infonce_backward`` with only dq or only dk) under each candidate tile,
checks its output against the shipped tile's (a wrong result under some tile is a bug, reported as such), and
times it with ``triton.testing.do_bench``. The JSON lists ms per candidate and the best per kernel next to the
shipped one, so a GPU session can commit a measured table instead of a guessed one. Compilation dominates
(each candidate compiles once): after ``--budget`` seconds no new tile starts (the JSON marks what was cut).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastcl.kernels.infonce as I  # noqa: E402

# (name, dtype, N queries, M keys, C, kind): kind "moco" = a separate positive + a normalized queue,
# "inbatch" = positives among the keys (MoCo v3)
CASES = [("moco_bf16_c128", torch.bfloat16, 256, 65536, 128, "moco"),
         ("inbatch_bf16_c256", torch.bfloat16, 4096, 4096, 256, "inbatch"),
         ("moco_fp32_c128", torch.float32, 256, 65536, 128, "moco"),
         ("inbatch_bf16_c128", torch.bfloat16, 4096, 4096, 128, "inbatch"),
         ("inbatch_bf16_c1024", torch.bfloat16, 4096, 4096, 1024, "inbatch"),
         ("inbatch_fp32_c256", torch.float32, 4096, 4096, 256, "inbatch")]
SMOKE_CASES = [("moco_fp32_c32", torch.float32, 8, 40, 32, "moco"),
               ("inbatch_fp16_c64", torch.float16, 16, 16, 64, "inbatch")]


def candidates(dtype, C, smoke=False):
    if smoke:
        return [(16, 16, 1, 1), (32, 16, 1, 1)]
    blocks = (16, 32, 64) if C >= 512 or dtype == torch.float32 else (32, 64, 128)
    stages = (1,) if dtype == torch.float32 else (1, 2)
    out = [(bm, bn, nw, st) for bm, bn, nw, st in itertools.product(blocks, blocks, (4, 8), stages)
           if bm * bn * max(C, 64) * (4 if dtype == torch.float32 else 2) <= 8 << 20]
    return out


def inputs(dtype, N, M, C, kind, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(N, C, generator=g).to(device, dtype)
    if kind == "moco":
        keys = torch.nn.functional.normalize(torch.randn(M, C, generator=g), dim=1).to(device, dtype)
        pos_keys, pos_index, norm_k = torch.randn(N, C, generator=g).to(device, dtype), None, False
    else:
        keys = torch.randn(M, C, generator=g).to(device, dtype)
        pos_keys, pos_index, norm_k = None, torch.arange(N, device=device), True
    return dict(q=q, keys=keys, pos_keys=pos_keys, pos_index=pos_index, self_index=None, temperature=0.2,
                norm_q=True, norm_k=norm_k, norm_p=True)


def runner(kernel, a):
    """A closure running ``kernel`` alone under the current tile settings; returns its output tensor."""
    fwd_args = (a["q"], a["keys"], a["pos_keys"], a["pos_index"], a["self_index"], a["temperature"],
                a["norm_q"], a["norm_k"], a["norm_p"])
    if kernel == "fwd":
        return lambda: I.infonce_forward(*fwd_args)[1]  # the log-sum-exp
    loss, lse, ppos, rk = I.infonce_forward(*fwd_args)
    g = torch.full_like(loss, 1.0 / len(loss))
    rk = rk if a["norm_k"] else a["q"]

    def run():
        dq, dk, _ = I.infonce_backward(g, a["q"], a["keys"], a["pos_keys"], a["pos_index"], a["self_index"], lse,
                                       ppos, rk, a["temperature"], a["norm_q"], a["norm_k"], a["norm_p"],
                                       kernel == "dq", kernel == "dk", False)
        return dq if kernel == "dq" else dk
    return run


def with_tile(kernel, tile):
    """Patch ``_settings`` so that ``kernel`` gets ``tile`` and the others their shipped tiles."""
    shipped = I._settings

    def settings(C, dtype, device, k):
        if k != kernel or tile is None:
            return shipped(C, dtype, device, k)
        bm, bn, nw, st = tile  # the shipped BLOCK_C and CHUNK_C (feature chunking of the logits dot) stay
        return dict(shipped(C, dtype, device, k), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=st)
    return settings


def tune(cases, smoke, budget, warmup, rep):
    from triton.testing import do_bench

    device = "cpu" if smoke else "cuda"
    shipped = I._settings
    results, t0 = {}, time.monotonic()
    for name, dtype, N, M, C, kind in cases:
        if results and time.monotonic() - t0 > budget:
            results[name] = {"skipped": f"budget of {budget:.0f} s spent"}
            continue
        a = inputs(dtype, N, M, C, kind, device)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        res = results[name] = {"dtype": str(dtype).replace("torch.", ""), "N": N, "M": M, "C": C, "kind": kind}
        for kernel in ("fwd", "dq") if kind == "moco" else ("fwd", "dq", "dk"):  # (MoCo's queue takes no gradient)
            ref = runner(kernel, a)().float()
            cfg = shipped(C, dtype, device, kernel)
            ship = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
            rows = []
            for tile in [ship] + [t for t in candidates(dtype, C, smoke) if t != ship]:
                if rows and time.monotonic() - t0 > budget:  # keep what was timed; the JSON says it was cut
                    res["cut_by_budget"] = True
                    break
                I._settings = with_tile(kernel, tile)
                try:
                    fn = runner(kernel, a)
                    out = fn().float()
                    ok = bool(torch.allclose(out, ref, **tol))
                    ms = None if smoke else do_bench(fn, warmup=warmup, rep=rep)
                    rows.append({"tile": tile, "ms": ms, "ok": ok})
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.: record and go on
                    rows.append({"tile": tile, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                finally:
                    I._settings = shipped
            timed = [r for r in rows if r.get("ok") and r.get("ms") is not None]
            best = min(timed, key=lambda r: r["ms"]) if timed else None
            res[kernel] = {"shipped": {"tile": ship, "ms": rows[0].get("ms")}, "best": best, "all": rows,
                           "wrong": [r["tile"] for r in rows if r.get("ok") is False]}
            if not smoke and best:
                print(f"{name:22s} {kernel}: shipped {ship} {rows[0].get('ms') or float('nan'):.4f} ms, best "
                      f"{tuple(best['tile'])} {best['ms']:.4f} ms ({(rows[0].get('ms') or 0) / best['ms']:.2f}x)",
                      flush=True)
            if res[kernel]["wrong"]:
                print(f"{name} {kernel}: WRONG results under tiles {res[kernel]['wrong']}", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tune_infonce.json"))
    p.add_argument("--budget", type=float, default=120.0, help="seconds after which no new case starts (default: 120)")
    p.add_argument("--warmup", type=int, default=5, help="do_bench warm-up ms (default: 5)")
    p.add_argument("--rep", type=int, default=25, help="do_bench repetition ms (default: 25)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 tiles, no timing (runs on CPU under "
                                                        "TRITON_INTERPRET=1): checks the script and the tiles agree")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: timing needs a CUDA GPU (use --smoke with TRITON_INTERPRET=1 on a CPU)", file=sys.stderr)
        return 1
    res = tune(SMOKE_CASES if args.smoke else CASES, args.smoke, args.budget, args.warmup, args.rep)
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)",
            "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "cases": res}, indent=1))
    print(f"tune_infonce: {args.out}")
    wrong = [(n, k) for n, r in res.items() for k in ("fwd", "dq", "dk") if isinstance(r.get(k), dict) and r[k]["wrong"]]
    if wrong:
        print(f"error: wrong results under some tiles: {wrong} (see {args.out})", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
