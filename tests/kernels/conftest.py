import pytest
import torch

import fastcl.kernels as K


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run a test under each kernels backend ('triton' runs in the interpreter on CPU)."""
    old = K.get_backend()
    K.set_backend(request.param)
    yield request.param
    K.set_backend(old)


def pytest_configure(config):
    torch.manual_seed(0)
