"""Triton kernels for the worker's hot path, each with a plain-torch twin that the CPU runs
and the tests compare against."""

import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 (tests without a GPU): kernels run in Triton's interpreter on CPU
# tensors, which has no libdevice and cannot loop over bounds loaded from memory.
INTERPRETED = isinstance(_probe, InterpretedFunction)
