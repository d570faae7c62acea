"""The model with Triton kernels (attention and fused ops) against the plain-torch model:
the same logits for a chunked prefill and the decode steps after it. Without a GPU the
kernels run in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.attention import AttentionMetadata, KVCache, make_attention
from gpu_worker.model import LlamaModel, load_config
from gpu_worker.ops import make_ops
from tandem import models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (device, dtype): half precision also takes the narrow products through the Triton linear
CASES = [("cpu", torch.float32), ("cpu", torch.float16),
         pytest.param("cuda", torch.float32, marks=[pytest.mark.gpu, cuda]),
         pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.gpu, cuda])]
BLOCK = 16


def build(device, dtype, kernels, fuse_silu=False, fold_norms=False):
    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    config = load_config(source.folder)
    weights = models.random_state_dict(config, dtype, device, seed=3)
    for name, w in weights.items():  # larger weights: logits that tell kernels apart
        if not name.endswith("norm.weight"):
            w.mul_(8)
    ops = make_ops(device, kernels)
    if hasattr(ops, "fuse_silu"):  # the Triton ops' default is on
        ops.fuse_silu, ops.fold_norms = fuse_silu, fold_norms
    model = LlamaModel(config, weights, dtype, device, ops=ops)
    s = model.shape
    cache = KVCache(s.num_layers, 16, BLOCK, s.num_kv_heads, s.head_dim, dtype, device)
    return model, make_attention(cache, s.head_dim**-0.5, device, kernels)


def metadata(starts, counts, tables, device):
    """Rows computing tokens [start, start + count) of their sequence."""
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts, strict=True)])
    rows = torch.cat([torch.full((n,), r) for r, n in enumerate(counts)])
    table = torch.tensor(tables)
    slots = table[rows, positions // BLOCK] * BLOCK + positions % BLOCK
    query_start = torch.tensor([0, *counts]).cumsum(0)
    ctx = [s + n for s, n in zip(starts, counts, strict=True)]
    meta = AttentionMetadata(positions, slots, query_start, torch.tensor(ctx), table, rows,
                             max(counts), max(ctx))
    return {f.name: getattr(meta, f.name) for f in meta.__dataclass_fields__.values()}, \
        query_start[1:] - 1


def run_steps(device, dtype, kernels, fuse_silu=False, fold_norms=False):
    model, attention = build(device, dtype, kernels, fuse_silu, fold_norms)
    tables = [[3, 0, 9], [5, 1, 2]]
    gen = torch.Generator().manual_seed(0)
    steps = [([0, 0], [20, 7]), ([20, 7], [13, 30]), ([33, 37], [1, 1]), ([34, 38], [1, 1])]
    logits = []
    for starts, counts in steps:
        fields, last = metadata(starts, counts, tables, "cpu")
        fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        ids = torch.randint(0, model.shape.vocab, (sum(counts),), generator=gen).to(device)
        with torch.inference_mode():
            logits.append(model.forward(ids, AttentionMetadata(**fields), attention,
                                        last.to(device)).cpu())
    return logits


@pytest.mark.parametrize(("fuse_silu", "fold_norms"), [(False, False), (True, False),
                                                      (True, True)],
                         ids=["silu", "fused-silu", "folded-norms"])
@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_triton_model_matches_the_torch_model(device, dtype, fuse_silu, fold_norms,
                                              monkeypatch):
    from gpu_worker.kernels import linear as lin

    fused_calls, folded_calls = [], []
    for name, calls in (("gate_up_silu", fused_calls), ("normed_gate_up_silu", fused_calls),
                        ("linear_add", folded_calls), ("normed_linear", folded_calls)):
        kernel = getattr(lin, name)
        monkeypatch.setattr(lin, name, lambda *a, _k=kernel, _c=calls, **kw: _c.append(1) or
                            _k(*a, **kw))
    for triton_logits, torch_logits in zip(run_steps(device, dtype, "triton", fuse_silu,
                                                     fold_norms),
                                           run_steps(device, dtype, "torch"), strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(triton_logits.argmax(-1), torch_logits.argmax(-1))
        else:  # products summed in another order: a few half-precision ulps of the logits
            scale = torch_logits.abs().max().item()
            torch.testing.assert_close(triton_logits, torch_logits, rtol=0, atol=0.02 * scale)
    # half precision, decode-sized batches: the fused gate/up + SiLU and the folded norms ran
    # when asked
    assert bool(fused_calls) == (fuse_silu and dtype != torch.float32)
    assert bool(folded_calls) == (fold_norms and dtype != torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_folded_norms_move_the_norm_weights_into_the_next_products(dtype):
    """Half precision with folded norms: ``qkv * in_norm`` and ``gate_up * post_norm``,
    rounded once, and weightless norms; float32 (which folds nothing) keeps the weights."""
    unfolded, _ = build("cpu", dtype, "triton")
    folded, _ = build("cpu", dtype, "triton", fuse_silu=True, fold_norms=True)
    for plain, layer in zip(unfolded.layers, folded.layers, strict=True):
        if dtype == torch.float32:
            assert torch.equal(layer["qkv"], plain["qkv"])
            assert torch.equal(layer["in_norm"], plain["in_norm"])
            continue
        assert layer["in_norm"] is None and layer["post_norm"] is None
        for product, norm in (("qkv", "in_norm"), ("gate_up", "post_norm")):
            want = (plain[product].float() * plain[norm].float()).to(dtype)
            assert torch.equal(layer[product], want)
