"""The Triton paged-attention backend against TorchPagedAttention: decode (split-K),
prefill, chunked prefill and mixed batches, on shuffled block tables. The small cases run
in Triton's interpreter on CPU (compiled where a GPU is present); the GPU tests use
Llama-3-8B's attention shape and replay one captured decode graph over several context
lengths."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu_worker.attention import AttentionMetadata, KVCache, TorchPagedAttention
from gpu_worker.kernels.paged_attention import (
    TritonPagedAttention,
    decode_num_splits,
    few_pairs_splits,
)
from tests.gpu_worker.kernel_helpers import Rope

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The small cases run compiled where a GPU is present, else in the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCRATCH_BLOCK = 0  # never handed to a row; padded decode rows point here, as in the runner
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class Shape:
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    block_size: int = 16
    num_blocks: int = 24
    max_blocks: int = 4  # block table columns
    dtype: torch.dtype = torch.float32
    device: str = DEVICE


def make_meta(shape: Shape, cached: list[int], new: list[int], pad_rows: int = 0,
              ) -> AttentionMetadata:
    """Row b has ``cached[b]`` tokens in the cache and runs ``new[b]`` more; its blocks are
    a random, non-contiguous pick of the pool. ``pad_rows`` decode rows are appended the
    way the runner pads a decode bucket (context 1 on the scratch block)."""
    rows, bs = len(cached), shape.block_size
    pool = torch.randperm(shape.num_blocks - 1) + 1
    tables = pool[: rows * shape.max_blocks].view(rows, shape.max_blocks)
    tables = torch.cat([tables, torch.full((pad_rows, shape.max_blocks), SCRATCH_BLOCK)])
    cached, new = cached + [0] * pad_rows, new + [1] * pad_rows
    context_lens = torch.tensor([c + n for c, n in zip(cached, new, strict=True)])
    token_rows = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)])
    slots = tables[token_rows, positions // bs] * bs + positions % bs
    is_decode = max(new) == 1
    meta = AttentionMetadata(
        positions=positions, slot_mapping=slots,
        query_start=torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(new).cumsum(0)]),
        context_lens=context_lens, block_tables=tables, token_rows=token_rows,
        max_query_len=max(new),
        max_context_len=shape.max_blocks * bs if is_decode else int(context_lens.max()),
    )
    return _to(meta, shape.device)


def _to(meta: AttentionMetadata, device) -> AttentionMetadata:
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    return AttentionMetadata(**{
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def make_caches(shape: Shape) -> tuple[KVCache, KVCache]:
    """Two caches (two layers) holding the same random contents."""
    caches = [KVCache(2, shape.num_blocks, shape.block_size, shape.kv_heads, shape.head_dim,
                      shape.dtype, torch.device(shape.device)) for _ in range(2)]
    init = torch.randn(caches[0].data.shape, dtype=shape.dtype, device=shape.device)
    for c in caches:
        c.data.copy_(init)
    return caches[0], caches[1]


def make_qkv(shape: Shape, num_tokens: int, strided: bool = False):
    """q [tokens, heads, dim], k and v [tokens, kv_heads, dim]; ``strided``: views of one
    fused qkv tensor, as the model produces them."""
    s = shape
    sizes = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), dtype=s.dtype, device=s.device)
    q, k, v = qkv.split(sizes, dim=-1)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return (q.view(num_tokens, s.heads, -1), k.view(num_tokens, s.kv_heads, -1),
            v.view(num_tokens, s.kv_heads, -1))


def check(shape: Shape, cached: list[int], new: list[int], layer: int = 1, pad_rows: int = 0,
          strided: bool = False, **backend_options) -> None:
    torch.manual_seed(sum(cached) * 31 + sum(new))
    meta = make_meta(shape, cached, new, pad_rows)
    ref_cache, tri_cache = make_caches(shape)
    q, k, v = make_qkv(shape, meta.positions.shape[0], strided)
    scale = shape.head_dim**-0.5
    rope = Rope.make(shape.max_blocks * shape.block_size, shape.head_dim, shape.dtype,
                     shape.device)
    q_ref, k_ref, v_ref = (t.clone() for t in (q, k, v))  # each backend rotates its own q
    expected = TorchPagedAttention(ref_cache, scale).forward(layer, q_ref, k_ref, v_ref, meta,
                                                             rope)
    backend = TritonPagedAttention(tri_cache, scale, **backend_options)
    q_given = q.clone()
    got = backend.forward(layer, q, k, v, meta, rope)
    if backend.fuse_rope and meta.max_query_len == 1:
        assert torch.equal(q, q_given)  # rotated in registers only
    else:
        assert torch.equal(q, q_ref)  # both rotate q in place, exactly alike
    assert not backend.split_counters.any()  # every merge reset its counter
    tol = TOLERANCE[shape.dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert torch.equal(tri_cache.data, ref_cache.data)  # the new k, v at slot_mapping


# Contexts: 1, mid-block, exactly two blocks, three blocks and a bit; plus a padded row.
DECODE_CACHED = [0, 22, 31, 52]


@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
def test_decode_matches_reference_for_any_split_count(num_splits):
    check(Shape(), DECODE_CACHED, [1] * 4, pad_rows=1, num_splits=num_splits, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_dtypes_and_multi_block_tiles(dtype):
    """32 keys per iteration: each tile gathers two cache blocks."""
    check(Shape(head_dim=64, dtype=dtype), DECODE_CACHED, [1] * 4, num_splits=2, block_n=32)


@pytest.mark.parametrize("num_splits", [1, 3, 4, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_with_rope_fused_matches_reference(num_splits, dtype):
    """RoPE and the new token's cache write inside the decode launch: the same output and
    the same cache, for strided q/k/v views, a padded row and a row whose context is only
    the new token (48 + 1 keys in 16-key tiles: a last tile that holds only the new key,
    which with 4 splits is a split of no cached keys beside splits that have some)."""
    check(Shape(dtype=dtype), DECODE_CACHED + [48], [1] * 5, pad_rows=1, strided=True,
          num_splits=num_splits, block_n=16, fuse_rope=True)


def test_decode_with_more_splits_than_tiles_and_one_kv_head():
    check(Shape(heads=4, kv_heads=1), [0, 4], [1, 1], num_splits=3, block_n=16)


def test_prefill_of_whole_prompts():
    check(Shape(), [0, 0, 0], [20, 5, 1], block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_prefill_over_cached_context(dtype):
    check(Shape(dtype=dtype), [16, 7, 40], [10, 13, 3], block_n=32)


def test_mixed_batch_of_decode_and_prefill_rows_with_strided_inputs():
    check(Shape(head_dim=64), [30, 0, 12, 5], [1, 9, 4, 1], layer=0, strided=True)


@pytest.mark.parametrize("block_n", [16, 64])
def test_larger_cache_blocks_with_tiles_smaller_or_larger_than_a_block(block_n):
    shape = Shape(block_size=32, num_blocks=12, max_blocks=3)
    check(shape, [0, 40, 70], [1, 1, 1], num_splits=2, block_n=block_n)
    check(shape, [33, 0], [20, 7], block_n=block_n)


def test_split_count_fills_the_gpu_and_never_exceeds_the_tiles():
    assert decode_num_splits(1, 8, 4096, 132, 64, waves=4) == 64  # capped at 4096 / 64 tiles
    assert decode_num_splits(1, 8, 1024, 132, 64) == 16
    assert decode_num_splits(1, 8, 4096, 132, 64) == 33  # >= 2 programs per SM (default)
    assert decode_num_splits(32, 8, 8192, 132, 64) == 2
    assert decode_num_splits(32, 8, 8192, 132, 64, waves=4) == 3
    assert decode_num_splits(256, 8, 8192, 132, 64) == 1


def test_few_pairs_take_longer_programs_in_whole_waves():
    assert few_pairs_splits(256, 132, 64) == 1  # batch 32 x 8 kv heads: 256 programs
    assert few_pairs_splits(64, 132, 64) == 4  # 3 would leave the second wave 45% full
    assert few_pairs_splits(192, 132, 64) == 2
    assert few_pairs_splits(8, 132, 64) == 30  # 240 programs: the second wave 82% full
    assert few_pairs_splits(8, 132, 4) == 4  # at most one per key tile
    assert few_pairs_splits(8, 132, 8) == 8  # batch 1 at 1,024: two-tile splits leave SMs idle
    assert few_pairs_splits(8, 132, 32) == 16  # at 4,096 128 two-tile splits fill a wave
    cache = KVCache(1, 4, 16, 8, 128, torch.bfloat16, torch.device("cpu"))
    attention = TritonPagedAttention(cache, 1.0)
    if attention.few_pairs is None:  # shared memory too small for two 128-key stages
        pytest.skip("no few-pair programs on this device")
    assert attention.decode_launch(32, 8, 8192, 132) == (128, 2, 1)
    assert attention.decode_launch(34, 8, 8192, 132) == (64, attention.num_stages, 1)
    assert TritonPagedAttention(cache, 1.0, block_n=64).few_pairs is None  # tuned by hand


def test_rejects_shapes_the_kernels_cannot_tile():
    cache = KVCache(1, 4, 16, 2, 48, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="power"):
        TritonPagedAttention(cache, 1.0)


# --- on a GPU: Llama-3-8B's attention shape, bf16, and one graph for many contexts ---

GPU_SHAPE = Shape(heads=32, kv_heads=8, head_dim=128, num_blocks=20000, max_blocks=256,
                  dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fuse_rope", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gpu_decode_matches_reference(rows, fuse_rope):
    torch.manual_seed(rows)
    cached = torch.randint(0, 4095, (rows,)).tolist()
    check(GPU_SHAPE, cached, [1] * rows, strided=True, fuse_rope=fuse_rope)


@pytest.mark.gpu
@cuda
def test_gpu_chunked_prefill_matches_reference():
    check(GPU_SHAPE, [0, 1000, 37, 3000, 16], [300, 200, 1, 64, 129])


@pytest.mark.gpu
@cuda
def test_gpu_float32_is_exact_without_tf32():
    shape = Shape(head_dim=128)
    check(shape, DECODE_CACHED, [1] * 4, pad_rows=1, num_splits=3)
    check(shape, DECODE_CACHED, [1] * 4, num_splits=2, strided=True)  # views of a fused qkv
    check(shape, [30, 0, 12], [1, 9, 20])
    check(shape, DECODE_CACHED, [1] * 4, pad_rows=1, num_splits=3, fuse_rope=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fuse_rope", [False, True])
def test_gpu_decode_graph_replays_for_every_context_length(fuse_rope):
    shape, rows = GPU_SHAPE, 8
    torch.manual_seed(0)
    ref_cache, tri_cache = make_caches(shape)
    scale = shape.head_dim**-0.5
    backend = TritonPagedAttention(tri_cache, scale, fuse_rope=fuse_rope)
    reference = TorchPagedAttention(ref_cache, scale)
    meta = make_meta(shape, [100] * rows, [1] * rows)  # the static buffers
    q, k, v = make_qkv(shape, rows)
    rope = Rope.make(4096, shape.head_dim, shape.dtype, shape.device)
    backend.forward(0, q, k, v, meta, rope)  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(0, q, k, v, meta, rope)
    for cached in ([0] * rows, [5, 17, 4000, 15, 16, 900, 2047, 3], [4095] * rows):
        step = make_meta(shape, cached, [1] * rows)
        for name in ("positions", "slot_mapping", "context_lens", "block_tables"):
            getattr(meta, name).copy_(getattr(step, name))
        for static, fresh in zip((q, k, v), make_qkv(shape, rows), strict=True):
            static.copy_(fresh)
        ref_cache.data.copy_(tri_cache.data)
        q_ref, k_ref, v_ref = (t.clone() for t in (q, k, v))
        graph.replay()
        expected = reference.forward(0, q_ref, k_ref, v_ref, step, rope)
        tol = TOLERANCE[shape.dtype]
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
        assert torch.equal(tri_cache.data, ref_cache.data)
        assert not backend.split_counters.any()  # each replay's merges reset them
