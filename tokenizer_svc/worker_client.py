"""Starts the gpu_worker process, rings its doorbell and waits for its batches."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time

from tandem import slots as S
from tandem.link import Kind, Link, Message, PeerGone, ReadyInfo, StepTiming
from tokenizer_svc.config import EngineConfig

log = logging.getLogger("tokenizer_svc.worker")


def open_ipc_events(ready: ReadyInfo):
    from tokenizer_svc.device_events import DeviceEvents  # imports torch: CUDA only

    return DeviceEvents(ready.device, ready.event_handles)


class WorkerFailed(RuntimeError):
    """The worker died or reported a fatal error; the engine cannot go on."""


class WorkerClient:
    def __init__(self, cfg: EngineConfig, segment: S.SlotSegment) -> None:
        self.cfg = cfg
        self.segment = segment
        self.link: Link | None = None
        self.proc: subprocess.Popen | None = None
        self.num_blocks = 0
        self.device = ""  # as the worker reports it, e.g. "cuda:0"
        self.dtype = ""
        self.events = None  # DeviceEvents on CUDA: per slot (h2d_done, d2h_done)
        self._cancelled = threading.Event()  # cancel_start: start() gives up

    def _command(self, fd: int) -> list[str]:
        m, c, shape = self.cfg.model, self.cfg.cache, self.segment.layout.shape
        cmd = [sys.executable, "-m", "gpu_worker", "--shm", self.segment.name,
               "--link-fd", str(fd), "--model", m.spec, "--cache-dir", str(m.cache_dir),
               "--device", m.device, "--dtype", m.dtype, "--seed", str(m.seed),
               "--kernels", m.kernels,
               "--max-num-tokens", str(shape.max_num_tokens),
               "--max-num-rows", str(shape.max_num_rows),
               "--max-blocks-per-row", str(shape.max_blocks_per_row),
               "--max-top-logprobs", str(shape.max_top_logprobs),
               "--num-slots", str(self.segment.layout.num_slots),
               "--block-size", str(c.block_size),
               "--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.num_blocks is not None:
            cmd += ["--num-blocks", str(c.num_blocks)]
        if c.kv_cache_gib is not None:
            cmd += ["--kv-cache-gib", str(c.kv_cache_gib)]
        return cmd

    def start(self) -> int:
        """Start the worker and wait until it has warmed up; returns its KV block count."""
        ours, theirs = Link.pair()
        self.link = ours
        fd = theirs.fileno()
        self.proc = subprocess.Popen(self._command(fd), pass_fds=[fd])
        theirs.close()
        deadline = time.monotonic() + self.cfg.worker_start_timeout
        while time.monotonic() < deadline:
            if self._cancelled.is_set():
                self.proc.kill()
                raise WorkerFailed("start-up cancelled")
            try:
                msg = self._recv(timeout=1.0)
            except TimeoutError:
                continue
            if msg.kind != Kind.READY:
                raise WorkerFailed(f"unexpected {msg.kind.name} from the worker before READY")
            ready = ReadyInfo.decode(msg.payload)
            self.num_blocks, self.device, self.dtype = ready.num_blocks, ready.device, ready.dtype
            self.events = open_ipc_events(ready) if ready.event_handles else None
            log.info("worker ready (pid %d, %s, %d KV blocks, %s)", self.proc.pid, ready.device,
                     ready.num_blocks, "CUDA IPC events" if self.events else "CPU signals")
            return ready.num_blocks
        raise WorkerFailed(f"worker not ready after {self.cfg.worker_start_timeout:.0f} s")

    def cancel_start(self) -> None:
        """Any thread: make a ``start`` in progress give up now (it raises WorkerFailed).
        The worker is killed: it holds nothing yet that a clean stop would save."""
        self._cancelled.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _recv(self, timeout: float | None = None) -> Message:
        try:
            msg = self.link.recv(timeout)
        except TimeoutError:
            if self.proc.poll() is not None:
                raise WorkerFailed(f"worker exited with code {self.proc.returncode}") from None
            raise
        except PeerGone as exc:
            code = self.proc.wait(timeout=10)
            raise WorkerFailed(f"worker exited with code {code}") from exc
        if msg.kind == Kind.FAILED:
            raise WorkerFailed(f"worker failed: {msg.payload.decode(errors='replace')}")
        return msg

    def submit(self, slot: int, seq: int) -> None:
        try:
            self.link.send(Message(Kind.RUN, slot=slot, seq=seq))
        except PeerGone as exc:
            raise WorkerFailed("worker is gone") from exc

    def wait(self, seq: int, slot: int) -> StepTiming | None:
        """Block until batch ``seq``'s outputs are in ``slot``.

        On the CPU the worker says DONE when they are. On CUDA it says ENQUEUED as
        soon as the batch's work (and its d2h_done event) is enqueued, and we wait
        on that event ourselves: the record we wait for is then known to exist.
        """
        expected = Kind.ENQUEUED if self.events is not None else Kind.DONE
        msg = self._next(expected)
        if msg.seq != seq:
            raise WorkerFailed(f"expected batch {seq}, worker said {msg.kind.name} {msg.seq}")
        if self.events is not None:
            self.events.wait_outputs(slot)
        return StepTiming.decode(msg.payload)

    def _next(self, kind: Kind) -> Message:
        while True:
            try:
                msg = self._recv(timeout=5.0)
            except TimeoutError:
                continue  # still running; _recv has checked that the worker lives
            if msg.kind != kind:
                raise WorkerFailed(f"expected {kind.name}, worker said {msg.kind.name}")
            return msg

    def wait_inputs_copied(self, slot: int) -> None:
        """Block until the slot's last inputs are on the device (CUDA; at once on the CPU)."""
        if self.events is not None:
            self.events.wait_inputs_copied(slot)

    def trace(self, start: bool, path: str = "") -> dict:
        """Start or stop the worker's device timeline (nothing may be in flight)."""
        self.link.send(Message(Kind.TRACE, arg=int(start), payload=path.encode()))
        return json.loads(self._next(Kind.TRACED).payload or b"{}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(PeerGone, OSError):
                self.link.send(Message(Kind.SHUTDOWN))
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.link is not None:
            self.link.close()
