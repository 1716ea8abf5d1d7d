"""Benchmark: fused Triton InfoNCE vs the torch reference (materialized logits + F.cross_entropy).

Run (needs CUDA; skipped otherwise):
    pytest benchmarks/bench_infonce.py -s            # prints median [p20, p80] ms, ratio, peak memory
    pytest benchmarks/bench_infonce.py -s --benchmark-only

Shapes from issue 3: MoCo queue N=256, C=128, K=65536 fwd+bwd (fp32, bf16); MoCo v3 / in-batch
C=256, N=M=4096 and 16384 fwd+bwd, with peak memory beyond inputs and grads.
H100 goals: queue <= 0.10 ms, in-batch 4096 <= 0.35 ms, 16384 <= 2.5 ms with <= 64 MB extra.
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("InfoNCE benchmarks need a CUDA GPU (Triton kernels; the CPU interpreter is not a benchmark)",
                allow_module_level=True)

import fastcl.kernels as K  # noqa: E402
from fastcl.kernels import inbatch_infonce, moco_infonce  # noqa: E402
from triton.testing import do_bench  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]
GOALS_MS = {"moco": 0.10, 4096: 0.35, 16384: 2.5}


def setup_moco(dtype, N=256, C=128, Kq=65536):
    """One setup factory shared by the speed and memory runs."""
    q = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    queue = F.normalize(torch.randn(Kq, C, device="cuda"), dim=1).to(dtype)
    return (lambda: torch.autograd.grad(moco_infonce(q, k, queue, 0.2), [q, k])), (q, k, queue)


def setup_inbatch(N, dtype, C=256):
    q = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    return (lambda: torch.autograd.grad(inbatch_infonce(q, k, 0.2), [q, k])), (q, k)


def flops_fwd_bwd(n, m, c):
    # fwd: 1 GEMM (2nmc); bwd: recompute logits for dq and for dk (2 × 2nmc) + dq and dk GEMMs (2 × 2nmc)
    return 2 * n * m * c * 5


def peak_extra_mb(fn, inputs):
    """Peak memory during fwd+bwd beyond the inputs and the returned grads."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return (peak - grad_bytes) / 2**20


def _compute_floor(flops, ms, peak):
    tflops, src = peak
    if tflops is None:
        return f"compute floor: {src}"
    floor_ms = flops / (tflops * 1e12) * 1e3
    return f"compute floor {floor_ms:.4f} ms at {tflops:.0f} TFLOPS ({src}) = triton {ms / floor_ms:.1f}x floor"


def report(name, ms_triton, ms_torch, goal=None, flops=None, extra=""):
    ratio = ms_torch[0] / ms_triton[0]
    tf = f" {flops / ms_triton[0] / 1e9:.0f} TFLOPS" if flops else ""
    g = f" (goal <= {goal} ms: {'met' if ms_triton[0] <= goal else 'NOT met'})" if goal else ""
    print(f"\n[{torch.cuda.get_device_name()}] {name}: triton {ms_triton[0]:.4f} ms [{ms_triton[1]:.4f}, "
          f"{ms_triton[2]:.4f}]  torch {ms_torch[0]:.4f} ms [{ms_torch[1]:.4f}, {ms_torch[2]:.4f}]  "
          f"speedup x{ratio:.2f}{tf}{g}{extra}")
    return ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moco_queue(benchmark, dtype, peak_bandwidth):
    fn, (_, _, queue) = setup_moco(dtype)
    # the queue dominates the traffic: read by the forward and again by the backward (dq)
    bw, src = peak_bandwidth
    floor_ms = 2 * queue.numel() * queue.element_size() / (bw * 1e9) * 1e3
    with K.backend("torch"):
        t_torch = do_bench(fn, quantiles=QUANTILES)
    with K.backend("triton"):
        t_tri = do_bench(fn, quantiles=QUANTILES)
        ratio = report(f"moco_infonce N=256 C=128 K=65536 {dtype} fwd+bwd", t_tri, t_torch, GOALS_MS["moco"],
                       flops=2 * 256 * 65536 * 128 * 3,
                       extra=f"  floor {floor_ms:.4f} ms at {bw:.0f} GB/s ({src}) = triton {t_tri[0] / floor_ms:.1f}x "
                             f"floor, torch {t_torch[0] / floor_ms:.1f}x")
        benchmark.extra_info.update(torch_ms=t_torch[0], triton_ms=t_tri[0], speedup=ratio, floor_ms=floor_ms)
        benchmark(fn)


@pytest.mark.parametrize("N", [4096, 16384])
def test_inbatch(benchmark, N, peak_tflops):
    dtype = torch.bfloat16
    fn, inputs = setup_inbatch(N, dtype)
    with K.backend("torch"):
        t_torch = do_bench(fn, quantiles=QUANTILES)
        mem_torch = peak_extra_mb(fn, inputs)
    with K.backend("triton"):
        t_tri = do_bench(fn, quantiles=QUANTILES)
        mem_tri = peak_extra_mb(fn, inputs)
        ratio = report(f"inbatch_infonce N=M={N} C=256 bf16 fwd+bwd", t_tri, t_torch, GOALS_MS[N],
                       flops=flops_fwd_bwd(N, N, 256),
                       extra=f"  peak extra: triton {mem_tri:.1f} MB, torch {mem_torch:.1f} MB; "
                             + _compute_floor(flops_fwd_bwd(N, N, 256), t_tri[0], peak_tflops))
        benchmark.extra_info.update(torch_ms=t_torch[0], triton_ms=t_tri[0], speedup=ratio,
                                    triton_extra_mb=mem_tri, torch_extra_mb=mem_torch)
        benchmark(fn)
    if N == 16384:
        assert mem_tri <= 64, f"in-batch N=16384 used {mem_tri:.1f} MB beyond inputs/grads (goal 64 MB)"
