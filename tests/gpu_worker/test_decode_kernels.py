"""The decode step's input and sampling kernels against their torch twins and by hand.

Without a GPU they run in Triton's interpreter on CPU tensors; the tests marked gpu run them
on the GPU too, in bfloat16 and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from gpu_worker.kernels import decode
from gpu_worker.ops import TorchOps
from tandem import slots as S

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])]
SCRATCH, BLOCK_SIZE = 99, 16


def slot_inputs(device, max_rows=8, max_blocks=40, num_rows=5, seed=0):
    """A decode slot with 5 of 8 rows in use, three placeholders out of row order, and
    stale values in the rows past the batch (as a reused slot has)."""
    gen = torch.Generator().manual_seed(seed)

    def ints(*shape, high=1000):
        return torch.randint(0, high, shape, generator=gen, dtype=torch.int32)

    header = torch.zeros(S.NUM_HEADER_FIELDS, dtype=torch.int64)
    header[S.H_SEQ], header[S.H_NUM_ROWS], header[S.H_NUM_PLACEHOLDERS] = 17, num_rows, 3
    inputs = {
        "header": header, "input_ids": ints(max_rows), "positions": ints(max_rows),
        "slot_mapping": ints(max_rows), "context_lens": ints(max_rows, high=600) + 1,
        "block_tables": ints(max_rows, max_blocks, high=90),
        "placeholder_pos": torch.tensor([4, 0, 2] + [7] * (max_rows - 3), dtype=torch.int32),
        "placeholder_src": torch.tensor([1, 3, 0] + [5] * (max_rows - 3), dtype=torch.int32),
    }
    prev = ints(max_rows, high=50000)
    return {k: v.to(device) for k, v in inputs.items()}, prev.to(device)


def run_decode_inputs(fn, inputs, prev, rows, num_blocks):
    out_header = torch.zeros(4, dtype=torch.int64, device=prev.device)
    got = fn(inputs, prev, rows, num_blocks, SCRATCH, BLOCK_SIZE, out_header)
    return [t.cpu() for t in got], out_header.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_inputs_fill_placeholders_and_park_the_padding_rows(device):
    inputs, prev = slot_inputs(device)
    (ids, positions, slots, contexts, tables), out_header = run_decode_inputs(
        decode.decode_inputs, inputs, prev, rows=8, num_blocks=33)
    given, prev = inputs["input_ids"].cpu().long(), prev.cpu().long()
    assert ids.tolist() == [prev[3], given[1], prev[0], given[3], prev[1], 0, 0, 0]
    assert positions[:5].tolist() == inputs["positions"][:5].tolist()
    assert positions[5:].tolist() == [0] * 3
    assert slots[5:].tolist() == [SCRATCH * BLOCK_SIZE] * 3
    assert contexts[:5].tolist() == inputs["context_lens"][:5].tolist()
    assert contexts[5:].tolist() == [1] * 3
    assert torch.equal(tables[:5], inputs["block_tables"][:5, :33].cpu().long())
    assert (tables[5:] == SCRATCH).all() and tables.dtype == torch.int64
    assert out_header[S.O_SEQ] == 17 and out_header[S.O_NUM_ROWS] == 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rows", "num_blocks"), [(8, 40), (4, 1), (1, 129 // 16)])
def test_decode_inputs_match_the_torch_twin(device, rows, num_blocks):
    inputs, prev = slot_inputs(device, num_rows=min(rows, 5), seed=rows)
    got = run_decode_inputs(decode.decode_inputs, inputs, prev, rows, num_blocks)
    expected = run_decode_inputs(TorchOps.decode_inputs, inputs, prev, rows, num_blocks)
    for a, b in zip([*got[0], got[1]], [*expected[0], expected[1]], strict=True):
        assert torch.equal(a, b)


def test_decode_inputs_refuse_more_than_the_slot_holds():
    inputs, prev = slot_inputs("cpu")
    with pytest.raises(ValueError, match="exceed"):
        run_decode_inputs(decode.decode_inputs, inputs, prev, rows=9, num_blocks=4)


def logits_with_ties(rows, vocab, dtype, device):
    """Random logits whose maximum appears twice in some rows: across the splits, inside
    one loop block, and at the very end."""
    logits = torch.randn(rows, vocab, dtype=torch.float32).to(dtype)
    top = logits.max() + 1
    ties = [(0, vocab - 1), (5, 6), (vocab // 2, min(vocab // 2 + 2049, vocab - 1))]
    for row, (a, b) in enumerate(ties[:rows]):
        logits[row, a] = logits[row, b] = top
    if rows > 3:
        logits[3] = top  # every entry equal: the first
    return logits.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 40000), (5, 3000), (4, 17)])
def test_argmax_picks_the_first_maximum(dtype, rows, vocab):
    logits = logits_with_ties(rows, vocab, dtype, "cpu")
    out = torch.full((rows,), -1, dtype=torch.int32)
    decode.argmax_into(logits, out)
    assert out.tolist() == logits.argmax(-1).tolist()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows", [1, 32, 256])
def test_argmax_on_the_gpu_at_a_llama3_vocabulary(rows):
    logits = logits_with_ties(rows, 128256, torch.bfloat16, "cuda")
    out = torch.empty(rows, dtype=torch.int32, device="cuda")
    decode.argmax_into(logits, out)
    assert torch.equal(out.long(), logits.argmax(-1))


@pytest.mark.gpu
@cuda
def test_decode_ends_replay_in_a_cuda_graph():
    inputs, prev = slot_inputs("cuda")
    logits = torch.randn(8, 128256, device="cuda").to(torch.bfloat16)
    sampled = torch.empty(8, dtype=torch.int32, device="cuda")
    out_header = torch.zeros(4, dtype=torch.int64, device="cuda")

    def step():
        got = decode.decode_inputs(inputs, prev, 8, 40, SCRATCH, BLOCK_SIZE, out_header)
        decode.argmax_into(logits, sampled)
        return got

    step()  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh, fresh_prev = slot_inputs("cuda", num_rows=7, seed=3)
    for name, tensor in inputs.items():
        tensor.copy_(fresh[name])
    prev.copy_(fresh_prev)
    logits.copy_(torch.randn(8, 128256, device="cuda"))
    graph.replay()
    expected = run_decode_inputs(TorchOps.decode_inputs, inputs, prev, 8, 40)
    for a, b in zip(captured, expected[0], strict=True):
        assert torch.equal(a.cpu(), b)
    assert torch.equal(out_header.cpu(), expected[1])
    assert torch.equal(sampled.long(), logits.argmax(-1))
