"""Three CUDA streams chained by events: host-to-device, compute, device-to-host.

Per batch in slot ``k``::

    H2D:     wait compute_done[k] (the slot's last batch has read its inputs)
             copy the slot's input area → device          record h2d_done[k]
    compute: wait h2d_done[k], wait d2h_done[k] (last outputs copied out)
             placeholders, model, sampling → device outputs  record compute_done[k]
    D2H:     wait compute_done[k]
             copy device outputs → the slot's output area     record d2h_done[k]

``h2d_done`` and ``d2h_done`` are interprocess events: tokenizer_svc opens
their handles and waits on them itself, so the worker's loop only enqueues and
never waits for the GPU. Every event is created once and lives as long as the
pipeline, so the handles tokenizer_svc holds stay valid.

On the CPU the same stages run one after the other, synchronously.

The compute stream's busy time and idle gap per step are measured with timing
events (host clocks on the CPU) and read back once a batch is known to be done,
never waited for: :meth:`Pipeline.step_timing`.
"""

from __future__ import annotations

import time

import torch

from gpu_worker.device_slots import DeviceSlots
from gpu_worker.runner import BatchInfo, ModelRunner

TIMING_RING = 8  # timing events kept per pipeline; > slots, so a finished batch's survive


class Pipeline:
    def __init__(self, slots: DeviceSlots, runner: ModelRunner) -> None:
        self.slots = slots
        self.runner = runner
        self.cuda = slots.device.type == "cuda"
        if self.cuda:
            self.h2d, self.compute, self.d2h = (torch.cuda.Stream(slots.device) for _ in range(3))
            n = len(slots.slots)
            self.h2d_done = [torch.cuda.Event(interprocess=True) for _ in range(n)]
            self.compute_done = [torch.cuda.Event() for _ in range(n)]
            self.d2h_done = [torch.cuda.Event(interprocess=True) for _ in range(n)]
            self.step_start = [torch.cuda.Event(enable_timing=True) for _ in range(TIMING_RING)]
            self.step_end = [torch.cuda.Event(enable_timing=True) for _ in range(TIMING_RING)]
        self.host_times: dict[int, tuple[float, float]] = {}  # CPU: seq -> (start, end)

    @property
    def is_async(self) -> bool:
        """True when launch() returns before the batch has finished."""
        return self.cuda

    def ipc_handles(self) -> tuple[tuple[str, str], ...]:
        if not self.cuda:
            return ()
        return tuple((h.ipc_handle().hex(), d.ipc_handle().hex())
                     for h, d in zip(self.h2d_done, self.d2h_done, strict=False))

    @torch.inference_mode()
    def launch(self, k: int, info: BatchInfo) -> None:
        buf = self.slots.slots[k]
        if not self.cuda:
            start = time.perf_counter()
            buf.dev_in.copy_(buf.host_in)
            if info.history_len:
                buf.dev_history.copy_(buf.host_history)
            self.runner.run(k, info)
            buf.host_out.copy_(buf.dev_out)
            self.host_times[info.seq] = (start, time.perf_counter())
            self.host_times.pop(info.seq - TIMING_RING, None)
            return
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(self.compute_done[k])
            buf.dev_in.copy_(buf.host_in, non_blocking=True)
            if info.history_len:
                buf.dev_history.copy_(buf.host_history, non_blocking=True)
            self.h2d_done[k].record(self.h2d)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(self.h2d_done[k])
            self.compute.wait_event(self.d2h_done[k])
            self.step_start[info.seq % TIMING_RING].record(self.compute)
            self.runner.run(k, info)
            self.step_end[info.seq % TIMING_RING].record(self.compute)
            self.compute_done[k].record(self.compute)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(self.compute_done[k])
            buf.host_out.copy_(buf.dev_out, non_blocking=True)
            self.d2h_done[k].record(self.d2h)

    def step_timing(self, seq: int) -> tuple[float, float] | None:
        """(busy seconds, idle seconds before it) of the compute stream for batch ``seq``,
        which must be finished; None when unknown (first batch, or not recorded)."""
        if seq < 2:
            return None
        if not self.cuda:
            this, prev = self.host_times.get(seq), self.host_times.get(seq - 1)
            if this is None or prev is None:
                return None
            return this[1] - this[0], max(this[0] - prev[1], 0.0)
        start, end = self.step_start[seq % TIMING_RING], self.step_end[seq % TIMING_RING]
        prev_end = self.step_end[(seq - 1) % TIMING_RING]
        if not end.query():
            return None
        busy = start.elapsed_time(end) / 1000
        return busy, max(prev_end.elapsed_time(start) / 1000, 0.0)

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        if not self.cuda or not self.runner.use_graphs:
            return 0
        with torch.cuda.stream(self.compute):
            n = self.runner.capture_graphs()
        torch.cuda.synchronize()
        return n

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.slots.device)
