"""Paged KV-cache accounting: which blocks of the worker's cache each request owns.

Plain Python, no torch. The worker holds ``num_blocks`` blocks of
``block_size`` token slots each; a request's KV lives in the blocks of its block
table, in order. Token ``p`` of a request sits in slot
``table[p // block_size] * block_size + p % block_size``.

Blocks are freed the moment their request finishes or is preempted, even if a
batch still in flight writes to them: the worker runs batches in order, so any
later batch that reuses a block writes it after the in-flight batch did.

**Prefix caching.** Once a batch that wrote a full block has completed, the
engine *registers* the block under a digest of its tokens and of every token
before them (:meth:`register`). A registered block whose last user lets go is
not forgotten: it waits, least recently released first, to be either reused by
a request whose prompt starts with the same tokens (:meth:`match_prefix`, then
:meth:`adopt`: that request skips computing them) or evicted when a block is
needed and none is plainly free. A request only ever writes blocks of its own
past its cached prefix, so a shared block is read-only. Requests are matched on
whole blocks and always compute at least their last token (its logits are
sampled).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence


def block_digests(tokens: Sequence[int], block_size: int, num_blocks: int,
                  parent: bytes = b"") -> list[bytes]:
    """The prefix digests of the first ``num_blocks`` full blocks of ``tokens``: each
    hashes its block's tokens and the digest before it (``parent`` for the first)."""
    digests = []
    for i in range(num_blocks):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        digests.append(parent)
    return digests


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # unused, holding nothing cached
        self._tables: dict[str, list[int]] = {}
        self._refs = [0] * num_blocks  # tables holding each block
        self._cached: dict[bytes, int] = {}  # prefix digest -> the block holding it
        self._digest_of: dict[int, bytes] = {}  # registered block -> its digest
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused: LRU first
        self._num_registered: dict[str, int] = {}  # req_id -> leading table blocks considered

    @property
    def num_free(self) -> int:
        """Blocks a request can get: plainly free, or cached and unused (evicted if taken)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

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
        for _ in range(need):
            block = self._free.popleft() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)
        return table

    def free(self, req_id: str) -> int:
        """Let go of all of ``req_id``'s blocks; returns how many it held. Registered
        blocks that no table holds any more stay cached (evictable); the rest are free."""
        table = self._tables.pop(req_id, [])
        self._num_registered.pop(req_id, None)
        for block in reversed(table):  # a prefix's tail is evicted before its head
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._digest_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        return len(table)

    def slot(self, req_id: str, position: int) -> int:
        """The cache slot of token ``position`` of ``req_id``."""
        block = self._tables[req_id][position // self.block_size]
        return block * self.block_size + position % self.block_size

    # --- prefix caching ---
    # ``known`` below is a request's own list of the digests of its first whole blocks, as
    # far as computed: a request's tokens never change, so each block is hashed once, for
    # matching and registering alike.
    def match_prefix(self, tokens: Sequence[int], known: list[bytes] | None = None,
                     ) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest whole-block prefix of ``tokens``, short of
        the last token, and their digests; ``known`` is extended as far as the walk goes
        (a request waiting for room asks again every step)."""
        if not (self.prefix_caching and self._cached):
            return [], []
        known = [] if known is None else known
        blocks = []
        for i in range((len(tokens) - 1) // self.block_size):
            self._extend(known, i + 1, lambda start, stop: tokens[start:stop])
            block = self._cached.get(known[i])
            if block is None:
                break
            blocks.append(block)
        return blocks, known[:len(blocks)]

    def adopt(self, req_id: str, blocks: list[int]) -> None:
        """Start ``req_id``'s (empty) table with cached ``blocks`` from :meth:`match_prefix`."""
        if self._tables.get(req_id):
            raise ValueError(f"{req_id} already holds blocks")
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self._tables[req_id] = list(blocks)
        self._num_registered[req_id] = len(blocks)

    def register(self, req_id: str, num_tokens: int,
                 token_ids: Callable[[int, int], Sequence[int]], known: list[bytes]) -> None:
        """The KV of ``req_id``'s first ``num_tokens`` tokens is in the cache: register its
        full blocks not registered yet (``token_ids(start, stop)`` gives the tokens). A
        block whose prefix another block already holds stays private."""
        table = self._tables.get(req_id)
        if not self.prefix_caching or table is None:
            return
        start = self._num_registered.get(req_id, 0)
        full = min(num_tokens // self.block_size, len(table))
        if full <= start:
            return
        self._extend(known, full, token_ids)
        for block, digest in zip(table[start:full], known[start:full], strict=True):
            if digest not in self._cached and block not in self._digest_of:
                self._cached[digest] = block
                self._digest_of[block] = digest
        self._num_registered[req_id] = full

    def _extend(self, known: list[bytes], count: int,
                token_ids: Callable[[int, int], Sequence[int]]) -> None:
        """Hash blocks onto ``known`` until it holds ``count`` digests."""
        if len(known) < count:
            size = self.block_size
            known += block_digests(token_ids(len(known) * size, count * size), size,
                                   count - len(known), known[-1] if known else b"")

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._digest_of.pop(block)]
        return block
