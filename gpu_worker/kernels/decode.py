"""The two ends of a captured decode step, each one or two launches instead of dozens.

- :func:`decode_inputs`: a decode batch's model inputs from its device slot. Placeholders
  take the previous batch's sampled ids, and the rows past the batch's own (the padding of
  the graph's row bucket) are pointed at the scratch block. Plain torch takes about thirty
  tiny launches for this, each a few microseconds of a step that is otherwise one graph.
- :func:`argmax_into`: greedy sampling, split over the vocabulary (a torch argmax over
  [rows, 128k] runs one program per row and takes 25 µs at 32 rows).

Their torch twins are ``gpu_worker.ops.TorchOps.decode_inputs`` and ``.argmax_into``; the
launchers allocate only outputs and never sync with the host, so both run inside a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels import num_sms
from tandem import slots as S

# ---------------------------------------------------------------- kernels


@triton.jit
def _decode_inputs_kernel(
    header_ptr, input_ids_ptr, positions_ptr, slot_mapping_ptr, context_lens_ptr,
    block_tables_ptr, bt_stride, placeholder_pos_ptr, placeholder_src_ptr, prev_ptr, prev_limit,
    out_header_ptr, ids_out, positions_out, slot_mapping_out, context_lens_out, block_tables_out,
    scratch_block, scratch_slot, NUM_BLOCKS: tl.constexpr,
    H_NUM_ROWS: tl.constexpr, H_NUM_PLACEHOLDERS: tl.constexpr, H_SEQ: tl.constexpr,
    O_SEQ: tl.constexpr, O_NUM_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0)
    num_rows = tl.load(header_ptr + H_NUM_ROWS)
    num_placeholders = tl.load(header_ptr + H_NUM_PLACEHOLDERS)
    valid = row < num_rows
    # the row's token: the previous batch's sample where a placeholder points at it
    j = tl.arange(0, BLOCK_R)
    pos = tl.load(placeholder_pos_ptr + j, mask=j < num_placeholders, other=-1)
    match = tl.max(tl.where(pos == row, j, -1), axis=0)
    token = tl.load(input_ids_ptr + row).to(tl.int64)
    if match >= 0:
        src = tl.minimum(tl.maximum(tl.load(placeholder_src_ptr + match), 0), prev_limit)
        token = tl.load(prev_ptr + src).to(tl.int64)
    tl.store(ids_out + row, tl.where(valid, token, 0))
    position = tl.load(positions_ptr + row).to(tl.int64)
    tl.store(positions_out + row, tl.where(valid, position, 0))
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    tl.store(slot_mapping_out + row, tl.where(valid, slot, scratch_slot))
    context = tl.load(context_lens_ptr + row).to(tl.int64)
    tl.store(context_lens_out + row, tl.where(valid, context, 1))
    b = tl.arange(0, BLOCK_B)
    for start in range(0, NUM_BLOCKS, BLOCK_B):  # static bounds (one graph, one width)
        mask = start + b < NUM_BLOCKS
        blocks = tl.load(block_tables_ptr + row.to(tl.int64) * bt_stride + start + b, mask=mask)
        blocks = tl.where(valid, blocks.to(tl.int64), scratch_block)
        tl.store(block_tables_out + row.to(tl.int64) * NUM_BLOCKS + start + b, blocks, mask=mask)
    if row == 0:  # label the outputs that the rest of the step writes
        tl.store(out_header_ptr + O_SEQ, tl.load(header_ptr + H_SEQ))
        tl.store(out_header_ptr + O_NUM_ROWS, num_rows)


@triton.jit
def _argmax_partial_kernel(
    logits_ptr, stride, part_val_ptr, part_idx_ptr, num_splits,
    VOCAB: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, split): the first maximum of its chunk of the row."""
    row, split = tl.program_id(0), tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride
    lo = split * CHUNK
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32) + lo
    cols = tl.arange(0, BLOCK)
    for offset in range(0, CHUNK, BLOCK):
        start = lo + offset
        x = tl.load(base + start + cols, mask=(offset + cols < CHUNK) & (start + cols < VOCAB),
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0, tie_break_left=True)
        better = m > best  # strict: an earlier block keeps a tie
        best_idx = tl.where(better, start + i, best_idx)
        best = tl.where(better, m, best)
    tl.store(part_val_ptr + row * num_splits + split, best)
    tl.store(part_idx_ptr + row * num_splits + split, best_idx)


@triton.jit
def _argmax_final_kernel(part_val_ptr, part_idx_ptr, num_splits, out_ptr,
                         BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    vals = tl.load(part_val_ptr + row * num_splits + s, mask=s < num_splits,
                   other=float("-inf"))
    first = tl.argmax(vals, axis=0, tie_break_left=True)  # earliest split wins a tie
    tl.store(out_ptr + row, tl.load(part_idx_ptr + row * num_splits + first))


# ---------------------------------------------------------------- launchers

_BLOCK_B = 128  # block-table entries per loop iteration
_ARGMAX_BLOCK = 2048  # logits per loop iteration
_ARGMAX_MIN_CHUNK = 4 * _ARGMAX_BLOCK


def decode_inputs(inputs: dict[str, torch.Tensor], prev_sampled: torch.Tensor, rows: int,
                  num_blocks: int, scratch_block: int, block_size: int,
                  out_header: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(ids, positions, slot_mapping, context_lens, block_tables), int64, of the first
    ``rows`` rows of a decode slot (``inputs``: the slot's device tensors by field name),
    and ``out_header``'s seq and row count set from the slot's header.

    Row r's token is ``prev_sampled[placeholder_src[j]]`` where ``placeholder_pos[j] == r``
    for a placeholder j, else ``input_ids[r]``. Rows at or past the header's row count get
    token 0, position 0, context 1, and the scratch block for their slot and block table."""
    header, tables = inputs["header"], inputs["block_tables"]
    if rows > inputs["context_lens"].shape[0] or num_blocks > tables.shape[1]:
        raise ValueError(f"{rows} rows x {num_blocks} blocks exceed the slot's "
                         f"{tuple(tables.shape)}")
    if tables.stride(1) != 1:
        raise ValueError("block tables need contiguous rows")
    device = header.device
    ids, positions, slot_mapping, context_lens = (
        torch.empty(rows, dtype=torch.int64, device=device) for _ in range(4))
    block_tables = torch.empty(rows, num_blocks, dtype=torch.int64, device=device)
    if rows:
        _decode_inputs_kernel[(rows,)](
            header, inputs["input_ids"], inputs["positions"], inputs["slot_mapping"],
            inputs["context_lens"], tables, tables.stride(0), inputs["placeholder_pos"],
            inputs["placeholder_src"], prev_sampled, prev_sampled.shape[0] - 1, out_header,
            ids, positions, slot_mapping, context_lens, block_tables,
            scratch_block, scratch_block * block_size, NUM_BLOCKS=num_blocks,
            H_NUM_ROWS=S.H_NUM_ROWS, H_NUM_PLACEHOLDERS=S.H_NUM_PLACEHOLDERS, H_SEQ=S.H_SEQ,
            O_SEQ=S.O_SEQ, O_NUM_ROWS=S.O_NUM_ROWS,
            BLOCK_R=triton.next_power_of_2(rows), BLOCK_B=_BLOCK_B, num_warps=1,
        )
    return ids, positions, slot_mapping, context_lens, block_tables


def argmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[r] = argmax(logits[r])``, the first maximum as torch picks it; out may be any
    integer dtype (the slot's sampled ids are int32). NaN logits are not ranked."""
    rows, vocab = logits.shape
    if out.shape != (rows,) or logits.stride(1) != 1:
        raise ValueError(f"logits {tuple(logits.shape)} (rows contiguous) into out "
                         f"{tuple(out.shape)}")
    if rows == 0:
        return out
    # enough programs to fill the device twice, none smaller than a few loop iterations
    splits = max(1, min(triton.cdiv(2 * num_sms(logits.device), rows),
                        triton.cdiv(vocab, _ARGMAX_MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), _ARGMAX_BLOCK) * _ARGMAX_BLOCK
    splits = triton.cdiv(vocab, chunk)
    part_val = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _argmax_partial_kernel[(rows, splits)](
        logits, logits.stride(0), part_val, part_idx, splits,
        VOCAB=vocab, CHUNK=chunk, BLOCK=_ARGMAX_BLOCK, num_warps=8,
    )
    _argmax_final_kernel[(rows,)](part_val, part_idx, splits, out,
                                  BLOCK_S=triton.next_power_of_2(splits), num_warps=1)
    return out
