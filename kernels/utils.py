"""Shared launch helpers for the fastcl Triton kernels (after Liger-Kernel ``ops/utils.py``).

``calculate_settings`` picks a power-of-two block and a warp count for a row of ``n`` elements and
raises for rows too long to hold in one block.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references still work, kernels are never launched
    class _TritonStub:
        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    class _LanguageStub:
        @staticmethod
        def constexpr(value=None):
            return value

        def __getattr__(self, name):
            return None

    triton, tl = _TritonStub(), _LanguageStub()

MAX_FUSED_SIZE = 65536  # largest row one program keeps in registers (Liger uses the same cap)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (TRITON_INTERPRET=1): no tensor cores, slow."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def calculate_settings(n: int) -> tuple[int, int]:
    block = next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(f"a row of {n} elements exceeds the fused block limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small split still exercises the split-reduction code paths


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def nvtx(name: str):
    """An NVTX range named ``fastcl.<name>`` on CUDA machines (Nsight Systems timelines), nothing elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(f"fastcl.{name}")
    return contextlib.nullcontext()
