"""Which engine-bound calls are in flight, and whether new ones are let in.

The relay admits every Generate, GenerateStream and Tokenize call here before it picks an
engine. A call counts as in flight from its admission until gRPC reports it done (its last
message and status sent, or the client gone), so a drain that sees no call in flight never
cuts a response short. Once `close` is called (the gateway is draining), new calls are
refused with `ShuttingDown` (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from gateway.errors import ShuttingDown


class DoneCallbacks(Protocol):
    """What admission needs from a server call (grpc.aio.ServicerContext has it)."""

    def add_done_callback(self, callback: Callable[[Any], None]) -> None: ...


class Admission:
    def __init__(self) -> None:
        self.is_closed = False
        self._calls: set[object] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_in_flight(self) -> int:
        return len(self._calls)

    def admit(self, context: DoneCallbacks) -> None:
        """Counts the call in flight until it is done; ShuttingDown once closed."""
        if self.is_closed:
            raise ShuttingDown()
        token = object()
        self._calls.add(token)
        self._idle.clear()
        context.add_done_callback(lambda _: self._done(token))

    def close(self) -> None:
        """Refuses new calls from now on; the ones in flight go on."""
        self.is_closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for no call to be in flight; whether none is."""
        if not self._calls:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _done(self, token: object) -> None:
        self._calls.discard(token)
        if not self._calls:
            self._idle.set()
