"""Benchmark: KeyQueue.enqueue (fused cast + L2-normalize + ring write, device pointer) vs the torch
reference (F.normalize + index_copy_, also sync-free) and MoCo's original host-pointer slice write.

Run (needs CUDA; skipped otherwise):
    pytest benchmarks/bench_queue.py -s
Shape: 256 keys of width 128 into a 65536-slot queue (bf16 keys into an fp32 queue, as under AMP).
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("queue benchmarks need a CUDA GPU", allow_module_level=True)

import fastcl.kernels as K  # noqa: E402
from fastcl.kernels import KeyQueue  # noqa: E402
from triton.testing import do_bench  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]


def moco_original(queue, ptr_host, keys):
    """MoCo builder.py _dequeue_and_enqueue: host pointer, batch must divide K."""
    b = keys.shape[0]
    queue[ptr_host[0]:ptr_host[0] + b] = F.normalize(keys.float(), dim=1)
    ptr_host[0] = (ptr_host[0] + b) % queue.shape[0]


@pytest.mark.parametrize("B", [256, 250])  # 250 does not divide 65536: wrap-around writes
def test_enqueue(benchmark, B, peak_bandwidth):
    q = KeyQueue(128, 65536).cuda()
    keys = torch.randn(B, 128, device="cuda", dtype=torch.bfloat16)
    with K.backend("torch"):
        t_torch = do_bench(lambda: q.enqueue(keys), quantiles=QUANTILES)
    with K.backend("triton"):
        t_tri = do_bench(lambda: q.enqueue(keys), quantiles=QUANTILES)
    bw, _ = peak_bandwidth
    floor_us = (keys.numel() * keys.element_size() + B * 128 * 4) / (bw * 1e9) * 1e6  # read keys, write fp32 rows
    extra = ""
    if 65536 % B == 0:
        ptr = [0]
        t_orig = do_bench(lambda: moco_original(q.queue, ptr, keys), quantiles=QUANTILES)
        extra = f"  moco-original {t_orig[0] * 1e3:.1f} us"
    print(f"\n[{torch.cuda.get_device_name()}] enqueue B={B} C=128 K=65536: triton {t_tri[0] * 1e3:.1f} us "
          f"[{t_tri[1] * 1e3:.1f}, {t_tri[2] * 1e3:.1f}]  torch {t_torch[0] * 1e3:.1f} us  "
          f"speedup x{t_torch[0] / t_tri[0]:.2f}{extra}  (bytes floor {floor_us:.2f} us at {bw:.0f} GB/s: "
          "launch-bound, a few us is the practical floor)")
    benchmark.extra_info.update(torch_ms=t_torch[0], triton_ms=t_tri[0])
    with K.backend("triton"):
        benchmark(lambda: q.enqueue(keys))


def test_enqueue_cuda_graph_capturable():
    """The device-side pointer makes enqueue capturable: replay the graph and check the pointer moved."""
    q = KeyQueue(128, 1000).cuda()
    keys = torch.randn(300, 128, device="cuda")
    with K.backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            q.enqueue(keys)  # warm-up compiles the kernels outside capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            q.enqueue(keys)
        before = q.ptr.item()
        g.replay()
        torch.cuda.synchronize()
        assert q.ptr.item() == (before + 300) % 1000
