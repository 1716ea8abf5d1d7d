"""Benchmark: fused Triton DINO loss vs the torch reference (a transcription of DINOLoss.forward).

Run (needs CUDA; skipped otherwise):
    pytest benchmarks/bench_dino_loss.py -s
Shape from issue 3: B=64 per crop, K=65536, 2 teacher (global) + 10 student crops (12 student
chunks), fwd+bwd. H100 goal: <= 1.0 ms. Also prints the bytes-moved floor of the fused kernel.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("DINO loss benchmarks need a CUDA GPU", allow_module_level=True)

import fastcl.kernels as K  # noqa: E402
from fastcl.kernels import dino_loss  # noqa: E402
from triton.testing import do_bench  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]


def setup(dtype, B=64, Kd=65536, n_global=2, n_local=10):
    s = torch.randn((n_global + n_local) * B, Kd, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.randn(n_global * B, Kd, device="cuda", dtype=dtype)
    c = torch.zeros(1, Kd, device="cuda")
    return (lambda: torch.autograd.grad(dino_loss(s, t, c, 0.1, 0.04)[0], [s])), (s, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dino_loss(benchmark, dtype, peak_bandwidth):
    fn, (s, t) = setup(dtype)
    with K.backend("torch"):
        t_torch = do_bench(fn, quantiles=QUANTILES)
    with K.backend("triton"):
        t_tri = do_bench(fn, quantiles=QUANTILES)
    # fused traffic: teacher read 3x, student read 2x, grad written once
    nbytes = 3 * t.numel() * t.element_size() + 3 * s.numel() * s.element_size()
    bw, src = peak_bandwidth
    floor_ms = nbytes / (bw * 1e9) * 1e3
    print(f"\n[{torch.cuda.get_device_name()}] dino_loss B=64 K=65536 2+10 crops {dtype} fwd+bwd: "
          f"triton {t_tri[0]:.3f} ms [{t_tri[1]:.3f}, {t_tri[2]:.3f}]  torch {t_torch[0]:.3f} ms  "
          f"speedup x{t_torch[0] / t_tri[0]:.2f}  ({nbytes / t_tri[0] / 1e9:.2f} TB/s effective, floor {floor_ms:.3f} ms "
          f"at {bw:.0f} GB/s ({src}) = triton {t_tri[0] / floor_ms:.2f}x floor; goal <= 1.0 ms: "
          f"{'met' if t_tri[0] <= 1.0 else 'NOT met'})")
    benchmark.extra_info.update(torch_ms=t_torch[0], triton_ms=t_tri[0], floor_ms=floor_ms)
    with K.backend("triton"):
        benchmark(fn)
