import os

# Must be set before any @triton.jit kernel is decorated (i.e. before fastcl.kernels ops import):
# without a GPU the Triton kernels run in the interpreter so CI checks them for real.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
