"""Device-side copies of the shared slots, and torch views of both sides.

For each slot ``k`` the worker keeps a device buffer with exactly the bytes of
the slot's input area (one host-to-device copy moves a whole batch) and one
with the bytes of its output area (one device-to-host copy returns it). Field
views over these buffers use the offsets of :class:`tandem.slots.SlotLayout`,
so the host and the device read the same layout.

On CUDA the whole shared segment is page-locked with ``cudaHostRegister``, so
the copies are true asynchronous DMA from and to the memory tokenizer_svc
writes and reads.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from tandem import slots as S

log = logging.getLogger("gpu_worker")
_TORCH_DTYPES = {np.dtype("int32"): torch.int32, np.dtype("int64"): torch.int64,
                 np.dtype("float32"): torch.float32}


def field_views(buf: torch.Tensor, fields: dict[str, S.Field], base: int) -> dict:
    """Typed views of ``buf`` (uint8) for each field, at ``field.offset - base``."""
    views = {}
    for f in fields.values():
        start = f.offset - base
        views[f.name] = buf[start : start + f.nbytes].view(_TORCH_DTYPES[f.dtype]).view(f.shape)
    return views


@dataclasses.dataclass
class SlotBuffers:
    host_in: torch.Tensor  # [input_nbytes] uint8, the shared slot's input area
    host_out: torch.Tensor  # [output_nbytes] uint8, the shared slot's output area
    dev_in: torch.Tensor  # [input_nbytes] uint8 on the device
    dev_out: torch.Tensor  # [output_nbytes] uint8 on the device
    inputs: dict  # field name -> view of dev_in
    outputs: dict  # field name -> view of dev_out
    host_history: torch.Tensor  # [history_nbytes] uint8: token histories (penalties)
    dev_history: torch.Tensor  # its device copy, made only for batches that need it
    history: torch.Tensor  # [rows, max_context] int32 view of dev_history


class DeviceSlots:
    def __init__(self, segment: S.SlotSegment, device: torch.device) -> None:
        layout = segment.layout
        self.layout = layout
        self.device = device
        self.whole = torch.frombuffer(segment.shm.buf, dtype=torch.uint8,
                                      count=layout.total_nbytes)
        self.registered = device.type == "cuda" and self._pin()
        self.slots = [self._buffers(k) for k in range(layout.num_slots)]

    def _pin(self) -> bool:
        """Page-lock the shared mapping in place (``pin_memory()`` would copy it)."""
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.whole.data_ptr(), self.whole.numel(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed with error {int(err)}")
        return True

    def _buffers(self, k: int) -> SlotBuffers:
        layout, base = self.layout, self.layout.slot_offset(k)
        out_base = base + layout.output_offset
        host_in = self.whole[base : base + layout.input_nbytes]
        host_out = self.whole[out_base : out_base + layout.output_nbytes]
        dev_in = torch.zeros(layout.input_nbytes, dtype=torch.uint8, device=self.device)
        dev_out = torch.zeros(layout.output_nbytes, dtype=torch.uint8, device=self.device)
        hist_base = base + layout.history_offset
        host_history = self.whole[hist_base : hist_base + layout.history_nbytes]
        dev_history = torch.zeros(layout.history_nbytes, dtype=torch.uint8, device=self.device)
        history = field_views(dev_history, layout.history_fields, layout.history_offset)
        return SlotBuffers(host_in, host_out, dev_in, dev_out,
                           field_views(dev_in, layout.input_fields, 0),
                           field_views(dev_out, layout.output_fields, layout.output_offset),
                           host_history, dev_history, history["history"])

    def host_is_pinned(self) -> bool:
        return bool(self.whole.is_pinned())

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.whole.data_ptr())
            self.registered = False
        self.slots = []
        self.whole = None
