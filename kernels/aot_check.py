"""Compile every kernel launch of the issue-3 shapes for a CUDA target without a GPU, and report
registers, spills and shared memory from ptxas. A development check for machines with no GPU:
it catches what the interpreter cannot (tl.dot dtype/shape rules, shared-memory overflow, spills).

    python -m fastcl.kernels.aot_check            # sm_90a (H100/H200), fp32 + fp16 + bf16
    python -m fastcl.kernels.aot_check --arch 80 --dtypes bf16 --widths 128

InfoNCE is compiled at every feature width in ``--widths`` (in-batch loss, forward + dq + dk). The
last line counts compiled and failed launches and those that spill registers (named above it); the
exit status is 1 if any launch failed or spilled.

The host functions run on CPU tensors as usual; ``JITFunction.run`` is replaced so each distinct
launch is compiled (not executed) for the target. Outputs of "launched" kernels are garbage, which
is fine: only signatures and constexprs matter. Takes minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: this compiles for a real GPU target")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
       torch.int32: "i32"}


def _install(target, arch, results):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        sig, consts = {}, {}
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _DT[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.__name__}: cannot type argument {p.name}={v!r}")
        key = (self.__name__, str(sorted(sig.items())), str(sorted(consts.items())), str(sorted(opts.items())))
        if key in results:
            return
        try:
            k = triton.compile(ASTSource(fn=self, signature=sig, constexprs=consts), target=target, options=opts)
            info = ""
            if os.path.exists(ptxas):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(k.asm["ptx"])
                r = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{arch}", f.name, "-o", os.devnull],
                                   capture_output=True, text=True)
                os.unlink(f.name)
                info = ", ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", r.stderr))
            shown = {a: b for a, b in consts.items()
                     if a.startswith(("BLOCK", "CHUNK", "PAD", "FP32", "NORM_K", "SCALE"))}
            results[key] = f"OK   {self.__name__} {shown} {opts} smem={k.metadata.shared} {info}"
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            results[key] = f"FAIL {self.__name__} {consts} {opts}: {str(e)[-1500:]}"
        print(results[key], flush=True)

    JITFunction.run = run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90a", help="CUDA arch for ptxas, e.g. 90a (H100), 80 (A100) (default: 90a)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32,fp16,bf16 (default: all three)")
    ap.add_argument("--widths", default="64,128,256,512,1024",
                    help="InfoNCE feature widths C to compile (default: 64,128,256,512,1024)")
    ap.add_argument("--sms", type=int, default=132, help="SM count assumed by the split heuristics (default: 132)")
    args = ap.parse_args(argv)
    cap = int(re.match(r"\d+", args.arch).group())
    results: dict = {}
    _install(GPUTarget("cuda", cap, 32), args.arch, results)
    utils = importlib.import_module("fastcl.kernels.utils")
    mods = {m: importlib.import_module(f"fastcl.kernels.{m}") for m in ("infonce", "ema", "queue", "dino_loss", "sinkhorn")}
    sms = lambda device: args.sms  # noqa: E731
    utils.num_sms = mods["infonce"].num_sms = mods["dino_loss"].num_sms = sms
    import fastcl.kernels as K

    K.set_backend("triton")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in args.dtypes.split(","):
        dt = dtypes[name]
        q = torch.randn(256, 128, dtype=dt, requires_grad=True)
        k = torch.randn(256, 128, dtype=dt, requires_grad=True)
        K.moco_infonce(q, k, torch.randn(65536, 128, dtype=dt), 0.2).backward()
        for c in (int(w) for w in args.widths.split(",")):
            q = torch.randn(4096, c, dtype=dt, requires_grad=True)
            k = torch.randn(4096, c, dtype=dt, requires_grad=True)
            K.inbatch_infonce(q, k, 0.2).backward()
        q = torch.randn(64, 128, dtype=dt, requires_grad=True)
        K.ntxent(q, torch.randn(64, 128, dtype=dt, requires_grad=True), 0.2).backward()
        s = torch.randn(12 * 64, 65536, dtype=dt, requires_grad=True)
        loss, _ = K.dino_loss(s, torch.randn(2 * 64, 65536, dtype=dt), torch.zeros(1, 65536), 0.1, 0.04)
        loss.backward()
        K.ema_update_([torch.randn(1000, dtype=dt)], [torch.randn(1000, dtype=dt)], torch.tensor(0.99))
        mods["queue"].enqueue_(torch.randn(65536, 128, dtype=dt), torch.zeros(1, dtype=torch.long),
                               torch.randn(256, 128, dtype=dt))
        K.sinkhorn(torch.randn(256, 3000, dtype=dt))
    failed = [r for r in results.values() if r.startswith("FAIL")]
    spills = [r for r in results.values() if re.search(r"\b[1-9]\d* bytes spill stores", r)]
    for r in spills:
        print("SPILL", r[5:])
    print(f"compiled {len(results) - len(failed)}, failed {len(failed)}, spilling {len(spills)}")
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
