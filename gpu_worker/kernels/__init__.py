"""Triton kernels for the worker's hot path, each with a plain-torch twin that the CPU runs
and the tests compare against.

On Hopper and later every kernel is launched with programmatic dependent launch (PDL): it
may start while the kernel before it in the stream is still finishing, runs whatever does
not read that kernel's output (address arithmetic, prefetching its weights into L2), then
waits on ``griddepcontrol.wait`` before its first dependent load. Every such kernel waits
in every program before it exits, so completion still follows stream order and a kernel
that waits sees the writes of all kernels before it, not just the last one.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 (tests without a GPU): kernels run in Triton's interpreter on CPU
# tensors, which has no libdevice and cannot loop over bounds loaded from memory.
INTERPRETED = isinstance(_probe, InterpretedFunction)


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (sm_90+)."""
    if INTERPRETED or device.type != "cuda":
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Wait for the kernel before this one (PDL), then let the next one launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
