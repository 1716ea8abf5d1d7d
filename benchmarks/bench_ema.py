"""Benchmark: EMA/momentum update of a full model: per-parameter Python loop vs
``torch._foreach_lerp_`` vs the Triton pointer-table kernel (EMAUpdater), against the memory floor.

Run (needs CUDA; skipped otherwise):
    pytest benchmarks/bench_ema.py -s
Models: torchvision resnet50 and timm vit_large_patch16_224 (pretrained=False), fp32 params.
Memory floor = (read target + read online + write target) bytes / peak HBM bandwidth; the peak is the
datasheet value for known GPUs (override with FASTCL_PEAK_BW_GBS) and a measured device copy
bandwidth is printed beside it. H100 goal: kernel <= 1.2x the floor.
"""
import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("EMA benchmarks need a CUDA GPU", allow_module_level=True)

from fastcl.kernels import EMAUpdater  # noqa: E402
from triton.testing import do_bench  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]
def make_model(name):
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50()
    import timm

    return timm.create_model("vit_large_patch16_224", pretrained=False)


@pytest.mark.parametrize("model_name", ["resnet50", "vit_large_patch16_224"])
def test_ema(benchmark, model_name, peak_bandwidth, copy_bandwidth):
    online = make_model(model_name).cuda()
    target = copy.deepcopy(online)
    tp, op = [p.data for p in target.parameters()], [p.data for p in online.parameters()]
    m = torch.tensor(0.996, device="cuda")

    def loop():
        for t, o in zip(tp, op):
            t.mul_(0.996).add_(o, alpha=0.004)

    def foreach():
        torch._foreach_lerp_(tp, op, 1.0 - m)

    upd = EMAUpdater(online, target)
    kernel = lambda: upd.update(m)  # noqa: E731

    nbytes = 3 * sum(p.numel() * p.element_size() for p in tp)
    bw, src = peak_bandwidth
    floor_ms = nbytes / (bw * 1e9) * 1e3
    t_loop = do_bench(loop, quantiles=QUANTILES)
    t_fe = do_bench(foreach, quantiles=QUANTILES)
    t_k = do_bench(kernel, quantiles=QUANTILES)
    print(f"\n[{torch.cuda.get_device_name()}] EMA {model_name} ({len(tp)} tensors, {nbytes / 3 / 2**20:.0f} MB): "
          f"loop {t_loop[0]:.3f} ms, foreach_lerp {t_fe[0]:.3f} ms, kernel {t_k[0]:.3f} ms "
          f"[{t_k[1]:.3f}, {t_k[2]:.3f}]; floor {floor_ms:.3f} ms at {bw:.0f} GB/s ({src}), "
          f"kernel = {t_k[0] / floor_ms:.2f}x floor (goal <= 1.2x), foreach = {t_fe[0] / floor_ms:.2f}x; "
          f"measured copy bw {copy_bandwidth:.0f} GB/s")
    benchmark.extra_info.update(loop_ms=t_loop[0], foreach_ms=t_fe[0], kernel_ms=t_k[0], floor_ms=floor_ms)
    benchmark(kernel)
