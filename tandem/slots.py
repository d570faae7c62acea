"""The shared-memory slots that carry batches from tokenizer_svc to gpu_worker.

One shared-memory segment holds ``num_slots`` slots. Each slot is one fixed
binary layout: an *input area* that tokenizer_svc writes (batch N+1 while batch
N runs) and gpu_worker copies to the device in one piece, followed by an
*output area* that gpu_worker fills with the sampled tokens. Both processes
build the same :class:`SlotLayout` from the same :class:`SlotShape` and view
the bytes through numpy; nothing is pickled.

Every field is 4-byte aligned and the input area is one contiguous run of bytes,
so the GPU side can copy it with a single host-to-device memcpy and view the
device copy with the same offsets.
"""

from __future__ import annotations

import contextlib
import dataclasses
from multiprocessing import shared_memory

import numpy as np

import tandem

# Input-header fields (int64 each).
H_SEQ = 0  # batch sequence number (1, 2, ...)
H_NUM_TOKENS = 1  # tokens in the batch
H_NUM_ROWS = 2  # requests (rows) in the batch
H_NUM_PLACEHOLDERS = 3  # input tokens to fill from the previous batch's output
H_PREV_SEQ = 4  # the batch that placeholders refer to (0: none)
H_MAX_QUERY_LEN = 5  # longest row, in tokens of this batch
H_MAX_CONTEXT_LEN = 6  # longest row, in tokens of context (cached + new)
H_NUM_TOP_LOGPROBS = 7  # top-N logprobs wanted by any row (0: none)
H_WANT_LOGPROBS = 8  # 1 if any row wants the sampled token's logprob
H_HISTORY_LEN = 9  # >0: rows carry token histories this long for penalties
NUM_HEADER_FIELDS = 16
MAX_BANNED_IDS = 32  # per row: tokens that may not be sampled (min_tokens)
MAX_LOGIT_BIAS = tandem.MAX_LOGIT_BIAS  # per row: tokens whose logits get a bias

# Output-header fields (int64 each).
O_SEQ = 0  # the batch these outputs belong to
O_NUM_ROWS = 1


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """The capacities that size a slot; both processes must agree on them."""

    max_num_tokens: int  # token budget of one batch
    max_num_rows: int  # requests in one batch
    max_blocks_per_row: int  # block-table width: ceil(max_context / block_size)
    max_top_logprobs: int = 20
    block_size: int = 16

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < (0 if field.name == "max_top_logprobs" else 1):
                raise ValueError(f"SlotShape.{field.name} must be positive")
        if self.max_num_rows > self.max_num_tokens:
            raise ValueError("SlotShape.max_num_rows must not exceed max_num_tokens")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    offset: int  # bytes from the start of the area
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _input_fields(s: SlotShape) -> list[tuple[str, str, tuple[int, ...]]]:
    t, r, m, _n = s.max_num_tokens, s.max_num_rows, s.max_blocks_per_row, s.max_top_logprobs
    return [
        ("header", "int64", (NUM_HEADER_FIELDS,)),
        ("temperature", "float32", (r,)),  # 0: greedy
        ("top_p", "float32", (r,)),  # 1: off
        ("seed", "int64", (r,)),
        ("input_ids", "int32", (t,)),  # placeholders hold -1 until filled
        ("positions", "int32", (t,)),
        ("slot_mapping", "int32", (t,)),  # KV slot = block * block_size + offset
        ("placeholder_pos", "int32", (t,)),  # index into input_ids
        ("placeholder_src", "int32", (t,)),  # row of the previous batch's output
        ("query_start", "int32", (r + 1,)),  # row b owns tokens [qs[b], qs[b+1])
        ("context_lens", "int32", (r,)),  # cached + new tokens of row b
        ("top_k", "int32", (r,)),  # 0: off
        ("min_p", "float32", (r,)),  # 0: off
        ("num_top_logprobs", "int32", (r,)),
        ("block_tables", "int32", (r, m)),
        ("banned_ids", "int32", (r, MAX_BANNED_IDS)),  # -1: unused
        ("bias_ids", "int32", (r, MAX_LOGIT_BIAS)),  # -1: unused
        ("bias_values", "float32", (r, MAX_LOGIT_BIAS)),
        ("repetition_penalty", "float32", (r,)),  # 1: off
        ("presence_penalty", "float32", (r,)),
        ("frequency_penalty", "float32", (r,)),
        ("prompt_lens", "int32", (r,)),
        ("history_src", "int32", (r,)),  # row of the previous batch that fills a -1 entry
    ]


def _history_fields(s: SlotShape) -> list[tuple[str, str, tuple[int, ...]]]:
    # Every token of a penalised row up to its last input token (-1: that one is a
    # placeholder; -2: padding). Copied to the device only for batches that use it.
    return [("history", "int32", (s.max_num_rows, s.max_blocks_per_row * s.block_size))]


def _output_fields(s: SlotShape) -> list[tuple[str, str, tuple[int, ...]]]:
    r, n = s.max_num_rows, max(s.max_top_logprobs, 1)
    return [
        ("out_header", "int64", (4,)),
        ("sampled_ids", "int32", (r,)),
        ("logprobs", "float32", (r,)),
        ("top_ids", "int32", (r, n)),
        ("top_logprobs", "float32", (r, n)),
    ]


def _lay_out(specs, start: int) -> tuple[dict[str, Field], int]:
    fields, offset = {}, start
    for name, dtype, shape in specs:
        align = np.dtype(dtype).itemsize
        offset = (offset + align - 1) // align * align
        fields[name] = Field(name, offset, np.dtype(dtype), shape)
        offset += fields[name].nbytes
    return fields, offset


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of every field of one slot, and of the slots in the segment."""

    shape: SlotShape
    num_slots: int = 2

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError("SlotLayout.num_slots must be at least 1")
        inputs, input_end = _lay_out(_input_fields(self.shape), 0)
        output_offset = (input_end + 63) // 64 * 64
        outputs, output_end = _lay_out(_output_fields(self.shape), output_offset)
        history_offset = (output_end + 63) // 64 * 64
        history, history_end = _lay_out(_history_fields(self.shape), history_offset)
        object.__setattr__(self, "input_fields", inputs)
        object.__setattr__(self, "output_fields", outputs)
        object.__setattr__(self, "history_fields", history)
        object.__setattr__(self, "input_nbytes", input_end)
        object.__setattr__(self, "output_offset", output_offset)
        object.__setattr__(self, "output_nbytes", output_end - output_offset)
        object.__setattr__(self, "history_offset", history_offset)
        object.__setattr__(self, "history_nbytes", history_end - history_offset)
        object.__setattr__(self, "slot_nbytes", (history_end + 4095) // 4096 * 4096)

    @property
    def total_nbytes(self) -> int:
        return self.slot_nbytes * self.num_slots

    def slot_offset(self, slot: int) -> int:
        return slot * self.slot_nbytes


class SlotView:
    """Numpy views of one slot's fields over a shared buffer (no copies).

    Attribute access returns the field's array, e.g. ``view.input_ids[:n]``.
    """

    def __init__(self, layout: SlotLayout, buffer, slot: int) -> None:
        self.layout = layout
        self.slot = slot
        base = layout.slot_offset(slot)
        self.input_bytes = np.frombuffer(buffer, np.uint8, layout.input_nbytes, base)
        self._arrays: dict[str, np.ndarray] = {}
        for f in layout.input_fields.values():
            self._arrays[f.name] = _view(buffer, base + f.offset, f)
        for f in (*layout.output_fields.values(), *layout.history_fields.values()):
            self._arrays[f.name] = _view(buffer, base + f.offset, f)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["_arrays"][name]
        except KeyError:
            raise AttributeError(name) from None

    def release(self) -> None:
        """Drop the views so that the segment can be closed."""
        self._arrays.clear()
        self.input_bytes = None


def _view(buffer, offset: int, f: Field) -> np.ndarray:
    count = int(np.prod(f.shape))
    return np.frombuffer(buffer, f.dtype, count, offset).reshape(f.shape)


class SlotSegment:
    """The shared-memory segment holding all slots.

    tokenizer_svc creates it (``create=True``) and unlinks it on exit;
    gpu_worker attaches to it by name.
    """

    def __init__(self, layout: SlotLayout, name: str | None = None, create: bool = False):
        self.layout = layout
        self.is_owner = create
        self.shm = shared_memory.SharedMemory(
            name=name, create=create, size=layout.total_nbytes if create else 0
        )
        if create:
            np.frombuffer(self.shm.buf, np.uint8)[:] = 0
        else:
            _untrack(self.shm)
        self.slots = [SlotView(layout, self.shm.buf, k) for k in range(layout.num_slots)]

    @property
    def name(self) -> str:
        return self.shm.name

    def close(self) -> None:
        for view in self.slots:
            view.release()
        self.slots = []
        # BufferError: a view is still alive somewhere; the OS reclaims the mapping on exit
        with contextlib.suppress(BufferError):
            self.shm.close()
        if self.is_owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Stop Python's resource tracker from unlinking a segment we only attached to.

    Before Python 3.13 every attach registers the segment, and the tracker unlinks
    it when the attaching process exits, under its creator's feet.
    """
    from multiprocessing import resource_tracker

    with contextlib.suppress(Exception):  # best effort; only a leak warning is at stake
        resource_tracker.unregister(shm._name, "shared_memory")
