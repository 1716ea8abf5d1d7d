import os

# Must be set before any @triton.jit kernel is decorated (i.e. before fastcl.kernels ops import):
# without a GPU the Triton kernels run in the interpreter so CI checks them for real.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- memory floors of the bandwidth-bound kernels
DATASHEET_GBS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                 "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}


def _env_or_datasheet(env: str, table: dict) -> tuple[float, str] | None:
    """(value, "env") from $env, else (value, "datasheet") for the first table key in the GPU's name, else None."""
    if env in os.environ:
        return float(os.environ[env]), "env"
    name = torch.cuda.get_device_name()
    return next(((float(v), "datasheet") for key, v in table.items() if key in name), None)


@pytest.fixture(scope="session")
def peak_bandwidth():
    """(GB/s, where it came from): $FASTCL_PEAK_BW_GBS, else the GPU's datasheet HBM bandwidth, else a measured
    device-to-device copy. Kernels are quoted as a multiple of bytes-moved / this."""
    return _env_or_datasheet("FASTCL_PEAK_BW_GBS", DATASHEET_GBS) or (_measured_copy_gbs(), "measured copy")


@pytest.fixture(scope="session")
def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy (read + write), printed beside the datasheet floor."""
    return _measured_copy_gbs()


def _measured_copy_gbs() -> float:
    from triton.testing import do_bench

    x = torch.empty(256 << 20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x)) / 1e6


# dense bf16 tensor-core peak (datasheet, TFLOPS), for compute-bound kernels (the in-batch InfoNCE GEMMs)
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989, "H100 SXM": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989,
                         "A100": 312}


@pytest.fixture(scope="session")
def peak_tflops():
    """(TFLOPS, source) or (None, reason): $FASTCL_PEAK_TFLOPS, else the datasheet dense bf16 peak."""
    return _env_or_datasheet("FASTCL_PEAK_TFLOPS", DATASHEET_BF16_TFLOPS) or \
        (None, f"unknown GPU {torch.cuda.get_device_name()!r}: set FASTCL_PEAK_TFLOPS")
