import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The eval tests run tiny ops; on a shared 2-core box two intra-op threads spin against other
    processes and make them ~7x slower (measured: 160 linear-probe steps 15.6 s vs 2.3 s at load 12)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
