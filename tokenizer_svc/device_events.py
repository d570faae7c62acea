"""The worker's CUDA interprocess events, opened in tokenizer_svc.

Only imported when the worker runs on CUDA: it needs torch and a CUDA context
here, though this process never launches a kernel.
"""

from __future__ import annotations

import torch


class DeviceEvents:
    def __init__(self, device: str, handles: tuple[tuple[str, str], ...]) -> None:
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self.h2d_done = [self._open(h2d) for h2d, _ in handles]
        self.d2h_done = [self._open(d2h) for _, d2h in handles]

    def _open(self, handle: str) -> torch.cuda.Event:
        return torch.cuda.Event.from_ipc_handle(self.device, bytes.fromhex(handle))

    def wait_inputs_copied(self, slot: int) -> None:
        """The slot's inputs may be rewritten once this returns."""
        self.h2d_done[slot].synchronize()

    def wait_outputs(self, slot: int) -> None:
        """The slot's outputs may be read once this returns."""
        self.d2h_done[slot].synchronize()
