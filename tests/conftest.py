"""Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors), so that CI
checks them against their torch references. Set before any kernel is decorated."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
