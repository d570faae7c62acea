"""The doorbell between tokenizer_svc and gpu_worker: small fixed-size messages.

Batches travel through the shared slots (:mod:`tandem.slots`); this link only
says *which* batch is where. It is a Unix ``SOCK_SEQPACKET`` socket pair, so each
message arrives whole, and a dead peer shows up as end-of-file.

Every message is one :data:`MESSAGE` struct: ``kind, slot, seq, arg``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import socket
import struct

MESSAGE = struct.Struct("<iiqq")
# Room for a trailing payload (e.g. CUDA IPC event handles) after the header.
MAX_MESSAGE_BYTES = 4096
# The internal gRPC between gateway and engine (not this link): the largest message either
# end sends or takes. Above the public API's 4 MiB, so that a largest client request, with
# its GenerateMany wrapping, still fits; both ends set it.
ENGINE_MAX_MESSAGE_BYTES = 64 << 20


class Kind(enum.IntEnum):
    # tokenizer_svc -> gpu_worker
    RUN = 1  # run batch `seq`, whose inputs are in `slot`
    SHUTDOWN = 2  # finish what is in flight, then exit
    # gpu_worker -> tokenizer_svc
    READY = 10  # model loaded and warmed up; `arg` = number of KV blocks
    DONE = 11  # outputs of batch `seq` are in `slot`
    ENQUEUED = 12  # batch `seq` is enqueued on the device; its events are recorded
    FAILED = 13  # fatal error; the payload is the message; the worker exits
    TRACE = 3  # tokenizer_svc -> worker: `arg` 1 starts the timeline, 0 stops and
    #            writes it to the path in the payload
    TRACED = 14  # worker -> tokenizer_svc: the TRACE request is done; payload: JSON summary


@dataclasses.dataclass(frozen=True)
class Message:
    kind: Kind
    slot: int = 0
    seq: int = 0
    arg: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return MESSAGE.pack(int(self.kind), self.slot, self.seq, self.arg) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Message:
        kind, slot, seq, arg = MESSAGE.unpack_from(data)
        return cls(Kind(kind), slot, seq, arg, bytes(data[MESSAGE.size :]))


@dataclasses.dataclass(frozen=True)
class ReadyInfo:
    """The READY message's payload: what the worker tells tokenizer_svc once warm."""

    num_blocks: int  # KV blocks the scheduler may hand out
    device: str  # e.g. "cuda:0" or "cpu"
    dtype: str  # e.g. "bfloat16"
    # Per slot, the CUDA IPC handles of the h2d_done and d2h_done events (hex);
    # empty on the CPU, where DONE messages take their place.
    event_handles: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> ReadyInfo:
        d = json.loads(data)
        return cls(d["num_blocks"], d["device"], d["dtype"],
                   tuple(tuple(h) for h in d["event_handles"]))


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Payload of DONE / ENQUEUED: how long an earlier batch kept the device busy, and
    how long the device's compute stream sat idle before it."""

    seq: int
    busy_s: float
    idle_s: float
    FORMAT = struct.Struct("<qdd")

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.seq, self.busy_s, self.idle_s)

    @classmethod
    def decode(cls, data: bytes) -> StepTiming | None:
        return cls(*cls.FORMAT.unpack(data)) if len(data) == cls.FORMAT.size else None


class PeerGone(ConnectionError):
    """The process at the other end of the link has exited."""


class Link:
    """One end of the doorbell socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Link, Link]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    @classmethod
    def from_fd(cls, fd: int) -> Link:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message) -> None:
        try:
            self.sock.sendall(message.encode())
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerGone("the peer closed the link") from exc

    def recv(self, timeout: float | None = None) -> Message:
        """Wait for the next message; raises ``TimeoutError`` or :class:`PeerGone`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE_BYTES)
        except TimeoutError:
            raise
        except (ConnectionResetError, OSError) as exc:
            raise PeerGone(str(exc)) from exc
        if not data:
            raise PeerGone("the peer closed the link")
        return Message.decode(data)

    def close(self) -> None:
        self.sock.close()
