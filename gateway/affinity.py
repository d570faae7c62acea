"""Prefix-aware routing: send a request where its prompt's beginning was sent before.

Each engine keeps a prefix cache (the KV of prompt prefixes it has computed), so a
request whose input starts like an earlier one runs faster on the engine that served the
earlier one. The gateway never tokenizes; it keys a request's input bytes (the text, the
chat messages with their roles, or the token ids) at every `CHUNK_BYTES`, remembers which
engine it routed each key to (least recently used keys are forgotten first), and prefers
the engine that was last sent the longest of the request's prefixes, among the engines whose load is
close to the least loaded one's. Affinity only ever picks among ready engines: it changes
speed, never results.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from tandem.v1 import generation_pb2 as pb

CHUNK_BYTES = 512  # about 128 tokens of English text
MAX_CHUNKS = 64  # keys per request: the first 32 KiB of its input
CAPACITY = 1 << 16  # (engine, key) pairs remembered


def input_bytes(request: pb.GenerateRequest) -> bytes:
    """The request's input as one byte string; different kinds never collide."""
    kind = request.WhichOneof("input")
    if kind == "text":
        return b"t" + request.text.encode()
    if kind == "messages":
        return b"m" + b"".join(m.role.encode() + b"\x1f" + m.content.encode() + b"\x1e"
                               for m in request.messages.messages)
    if kind == "token_ids":
        return b"i" + array("q", request.token_ids.ids).tobytes()
    return b""


def prefix_keys(data: bytes, chunk: int = CHUNK_BYTES, limit: int = MAX_CHUNKS) -> list[bytes]:
    """A digest of every whole-chunk prefix of ``data``, shortest first, each chained to
    the one before."""
    keys, parent = [], b""
    for start in range(0, min(len(data) // chunk, limit) * chunk, chunk):
        parent = hashlib.blake2b(parent + data[start:start + chunk], digest_size=12).digest()
        keys.append(parent)
    return keys


class PrefixAffinity:
    """Which engine each prefix key was last routed to, for at most ``capacity`` keys."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # key -> engine address

    def depth(self, address: str, keys: list[bytes]) -> int:
        """How far into ``keys`` the longest prefix last routed to ``address`` reaches (a key
        stands for its whole prefix: a shorter one routed elsewhere since changes nothing)."""
        for i in range(len(keys) - 1, -1, -1):
            if self._owner.get(keys[i]) == address:
                return i + 1
        return 0

    def record(self, address: str, keys: list[bytes]) -> None:
        for key in keys:
            self._owner[key] = address
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owner)
