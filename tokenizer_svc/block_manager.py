"""Paged KV-cache accounting: which blocks of the worker's cache each request owns.

Plain Python, no torch. The worker holds ``num_blocks`` blocks of
``block_size`` token slots each; a request's KV lives in the blocks of its block
table, in order. Token ``p`` of a request sits in slot
``table[p // block_size] * block_size + p % block_size``.

Blocks are freed the moment their request finishes or is preempted, even if a
batch still in flight writes to them: the worker runs batches in order, so any
later batch that reuses a block writes it after the in-flight batch did, and
only ever reads positions it wrote itself.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the blocks in use."""
        return 1.0 - self.num_free / self.num_blocks

    def table(self, req_id: str) -> list[int]:
        return self._tables.get(req_id, [])

    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        """New blocks ``req_id`` needs to hold ``num_tokens`` tokens in all."""
        have = len(self._tables.get(req_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, req_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(req_id, num_tokens) <= self.num_free - reserve

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Grow ``req_id``'s table to hold ``num_tokens`` tokens; returns the table."""
        need = self.blocks_needed(req_id, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"{need} KV blocks needed, {self.num_free} free")
        table = self._tables.setdefault(req_id, [])
        table.extend(self._free.popleft() for _ in range(need))
        return table

    def free(self, req_id: str) -> int:
        """Return all of ``req_id``'s blocks; returns how many were freed."""
        table = self._tables.pop(req_id, [])
        self._free.extend(table)
        return len(table)

    def slot(self, req_id: str, position: int) -> int:
        """The cache slot of token ``position`` of ``req_id``."""
        block = self._tables[req_id][position // self.block_size]
        return block * self.block_size + position % self.block_size
