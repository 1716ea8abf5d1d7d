"""Benchmark: fused Sinkhorn-Knopp (scaling-vector passes) vs SwAV's distributed_sinkhorn in torch.

Run (needs CUDA; skipped otherwise):
    pytest benchmarks/bench_sinkhorn.py -s
Shapes: SwAV ImageNet B=256 per GPU, K=3000 prototypes; and a large-batch B=4096, K=3000; 3 iters.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("Sinkhorn benchmarks need a CUDA GPU", allow_module_level=True)

import fastcl.kernels as K  # noqa: E402
from fastcl.kernels import sinkhorn  # noqa: E402
from triton.testing import do_bench  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]


@pytest.mark.parametrize("B", [256, 4096])
def test_sinkhorn(benchmark, B):
    scores = torch.randn(B, 3000, device="cuda").tanh()
    fn = lambda: sinkhorn(scores)  # noqa: E731
    with K.backend("torch"):
        t_torch = do_bench(fn, quantiles=QUANTILES)
    with K.backend("triton"):
        t_tri = do_bench(fn, quantiles=QUANTILES)
        print(f"\n[{torch.cuda.get_device_name()}] sinkhorn B={B} K=3000 3 iters: triton {t_tri[0] * 1e3:.1f} us "
              f"[{t_tri[1] * 1e3:.1f}, {t_tri[2] * 1e3:.1f}]  torch {t_torch[0] * 1e3:.1f} us  "
              f"speedup x{t_torch[0] / t_tri[0]:.2f}")
        benchmark.extra_info.update(torch_ms=t_torch[0], triton_ms=t_tri[0])
        benchmark(fn)
