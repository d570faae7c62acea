"""Triton kernels for the worker's hot path, each with a plain-torch twin that the CPU runs
and the tests compare against."""

import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 (tests without a GPU): kernels run in Triton's interpreter on CPU
# tensors, which has no libdevice and cannot loop over bounds loaded from memory.
INTERPRETED = isinstance(_probe, InterpretedFunction)
INTERPRETER_SHARED_MEMORY = 228 << 10  # the interpreter has no limit; a Hopper's, for configs


@functools.cache
def _cuda_limits(index: int) -> tuple[int, int]:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["multiprocessor_count"], props["max_shared_mem"]


def _limits(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 1, INTERPRETER_SHARED_MEMORY  # the interpreter: no parallelism to fill
    return _cuda_limits(device.index if device.index is not None else
                        torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Multiprocessors to fill (1 off CUDA)."""
    return _limits(device)[0]


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may take (the opt-in maximum per block)."""
    return _limits(device)[1]
