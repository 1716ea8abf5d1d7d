import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The shared CIFAR-10 cache ($FASTCL_DATA or ~/.cache/fastcl): downloaded/converted once per machine."""
    from fastcl.data.cifar10 import data_root, prepare_cifar10

    root = data_root(os.environ.get("FASTCL_DATA"))
    prepare_cifar10(root)
    return root
