"""The device timeline for the benchmark: kernel intervals from the profiler."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

STEP_PREFIX = "tandem_batch_"


class Tracer:
    """Records the device's kernels between start() and stop(path)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.profiler = None
        self.num_batches = 0

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()
        self.num_batches = 0

    def step(self, seq: int):
        """Context manager marking one batch's launch (its kernels carry the label)."""
        self.num_batches += 1
        return torch.profiler.record_function(f"{STEP_PREFIX}{seq}")

    def stop(self, path: str) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        fd, raw = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            profiler.export_chrome_trace(raw)
            events = json.loads(Path(raw).read_text()).get("traceEvents", [])
        finally:
            os.unlink(raw)
        timeline = timeline_from_events(events, str(self.device))
        Path(path).write_text(json.dumps(timeline))
        return {"path": path, "num_kernels": len(timeline["kernels_us"]),
                "num_batches": self.num_batches}


def timeline_from_events(events: list[dict], device: str) -> dict:
    """Kernel intervals (sorted) with their names, and per-batch GPU spans, from Chrome-trace
    events (µs). Names are stored once: ``kernel_names[kernel_name_ids[i]]`` is kernel i's."""
    named = sorted((e["ts"], e["ts"] + e.get("dur", 0), str(e.get("name", ""))) for e in events
                   if e.get("cat") == "kernel" and "ts" in e)
    kernels = [[start, end] for start, end, _ in named]
    ids: dict[str, int] = {}
    name_ids = [ids.setdefault(name, len(ids)) for _, _, name in named]
    steps = sorted([e["ts"], e["ts"] + e.get("dur", 0)] for e in events
                   if e.get("cat") == "gpu_user_annotation"
                   and str(e.get("name", "")).startswith(STEP_PREFIX))
    window = [kernels[0][0], max(k[1] for k in kernels)] if kernels else [0, 0]
    return {"device": device, "window_us": window, "kernels_us": kernels, "steps_us": steps,
            "kernel_names": list(ids), "kernel_name_ids": name_ids}
