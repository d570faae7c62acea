"""Triton kernels for the worker's hot path, each with a plain-torch twin that the CPU runs
and the tests compare against.

On Hopper and later the decode step's kernels launch with programmatic dependent launch
(PDL, :func:`use_pdl`): a kernel may start while the one before it in the stream finishes.
Before ``griddepcontrol.wait`` it touches only what no kernel writes (its weights); every
program waits before its first other access, and lets the next kernel launch
(``griddepcontrol.launch_dependents``) only after its main loop, so that the next kernel's
programs take the multiprocessors that this one's tail leaves idle rather than ones its
programs still need. Since every program waits, a kernel past its wait sees the writes of
every kernel before it in the stream, not only the last one's.
"""

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


# The kernel families that launch with programmatic dependent launch where the device has
# it (`python -m bench.sweep --pdl all|none|linear,norm,attention` measures them; see
# :func:`use_pdl`).
PDL_FAMILIES = ("linear", "norm", "attention")
PDL: frozenset[str] = frozenset(PDL_FAMILIES)


@functools.cache
def _has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device, family: str) -> bool:
    """Whether ``family``'s kernels on ``device`` launch with PDL: named in :data:`PDL`, on
    CUDA, sm_90 or later."""
    if family not in PDL or INTERPRETED or device.type != "cuda":
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device, family: str) -> dict[str, bool]:
    """A launch's PDL arguments: the kernel's ``USE_PDL`` and Triton's ``launch_pdl``."""
    pdl = use_pdl(device, family)
    return {"USE_PDL": pdl, "launch_pdl": pdl}


def num_sms(device: torch.device) -> int:
    """Multiprocessors to fill (1 off CUDA)."""
    return _limits(device)[0]


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may take (the opt-in maximum per block)."""
    return _limits(device)[1]
