"""The Llama family (Llama, SmolLM, Mistral, Qwen2's QKV biases, Qwen3's per-head q/k
norms) over a paged KV cache.

Weights load from a Hugging Face folder (safetensors) or come from a seeded
random generator (benchmark presets). Q/K/V and gate/up projections are fused
at load time, so a layer reads each weight matrix once per step. The numerics
follow Transformers' implementation (RMSNorm in float32, RoPE tables in float32),
so greedy output matches ``generate()`` on the same weights. Other architectures, and
configs or weights this code would not use (an MLP bias, tensors left over once a model is
built), are refused rather than run wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_worker.attention import AttentionBackend, AttentionMetadata
from gpu_worker.ops import TorchOps, TritonOps

Ops = TorchOps | TritonOps
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # Transformers' names for them


class LlamaShape:
    """The numbers of a Llama-family config that the model code needs."""

    def __init__(self, config) -> None:
        if config.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported; Tandem runs "
                             f"{', '.join(MODEL_TYPES)}")
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias is not supported (the MLP products have no bias)")
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.vocab = config.vocab_size
        self.eps = config.rms_norm_eps
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.qkv_bias = bool(getattr(config, "attention_bias", False)) or (
            config.model_type == "qwen2"
        )
        self.qk_norm = config.model_type == "qwen3"  # RMSNorm of each head's q and k
        self.max_positions = config.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class RotaryTable:
    """cos/sin for every position, computed as Transformers computes them."""

    def __init__(self, config, max_positions: int, dtype, device) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(config)
        inv_freq = rope.inv_freq.to(torch.float32)  # [head_dim / 2]
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos = (emb.cos() * rope.attention_scaling).to(dtype=dtype, device=device)
        sin = (emb.sin() * rope.attention_scaling).to(dtype=dtype, device=device)
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign lives in the table
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


class LlamaModel:
    """Weights as plain tensors and a forward pass over a flat batch of tokens.

    Each layer's residual add is fused with the next norm and the product before it
    (``ops.linear_add_norm``: TritonOps may fold the norm into the products on both sides), the
    attention backend applies RoPE to the views of the fused QKV output as it writes the
    cache, and the MLP's activation reads the fused gate/up output once. With ``TritonOps``
    and Triton attention a half-precision decode step's layer is five launches: four matrix
    products (the norms folded into them, SiLU-and-mul in the gate/up product's epilogue)
    and the attention with RoPE and the cache write."""

    def __init__(self, config, weights: dict[str, torch.Tensor], dtype, device,
                 ops: Ops | None = None) -> None:
        self.shape = s = LlamaShape(config)
        self.dtype, self.device = dtype, device
        self.ops = ops or TorchOps()
        self.embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.lm_head = self.embed if s.tied else weights["lm_head.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.layers = [_fuse_layer(weights, i, s) for i in range(s.num_layers)]
        kept = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
        unused = sorted(n for n in weights if n not in kept and
                        not n.endswith("rotary_emb.inv_freq"))
        if unused:
            raise ValueError(f"{len(unused)} weights this model code does not use, e.g. "
                             f"{unused[:4]}: not a Llama-family model it runs")
        if self.ops.folds_norms(dtype):  # else (float32, torch ops) the weights as given
            for layer in self.layers:
                _prescale_norms(layer)
        self.rope = RotaryTable(config, s.max_positions, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        meta: AttentionMetadata,
        attention: AttentionBackend,
        sample_index: torch.Tensor | None,  # [num_rows]: the token each row samples; None: all
    ) -> torch.Tensor:  # [num_rows, vocab] logits, in the model's dtype
        s, ops = self.shape, self.ops
        residual = F.embedding(input_ids, self.embed)  # [num_tokens, hidden], updated in place
        h = ops.rms_norm(residual, self.layers[0]["in_norm"], s.eps)
        for i, w in enumerate(self.layers):
            attn = self._attention(i, w, h, meta, attention)
            h = ops.linear_add_norm(attn, w["o"], residual, w["post_norm"], s.eps)
            act = ops.normed_gate_up_silu(h, w["gate_up"])
            if i + 1 < len(self.layers):
                h = ops.linear_add_norm(act, w["down"], residual, self.layers[i + 1]["in_norm"],
                                        s.eps)
            else:
                out = ops.linear(act, w["down"])
        if sample_index is None:
            last = residual + out
        else:  # only the sampled tokens go on
            last = residual[sample_index] + out[sample_index]
        return F.linear(ops.rms_norm(last, self.final_norm, s.eps), self.lm_head)

    def _attention(self, i, w, h, meta: AttentionMetadata, attention: AttentionBackend):
        s = self.shape
        qkv = self.ops.normed_linear(h, w["qkv"], w.get("qkv_bias"))  # [tokens, q + 2 kv]
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = _head_norm(q, w["q_norm"], s.eps), _head_norm(k, w["k_norm"], s.eps)
        out = attention.forward(i, q, k, v.view(-1, s.num_kv_heads, s.head_dim), meta, self.rope)
        return out.reshape(-1, s.q_size)  # the O product goes with the residual add


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over each head's last dimension, rounded as Transformers' Qwen3 rounds it."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _prescale_norms(layer: dict) -> None:
    """Move each norm's weight into the columns of the product that reads the norm's output
    (``qkv * in_norm``, ``gate_up * post_norm``, rounded once to the weights' dtype), so
    that a product finishing a folded norm takes x as it is rather than scaling every tile
    of it in its loop (H200, Llama-3-8B QKV at 32 rows: 17.7 us against 25.0,
    ``python -m bench.gemm --products normed_qkv,normed_qkv_prescaled``). The norms then
    carry no weight (None), on the unfolded paths (prefill, the first layer's norm) too."""
    for norm, product in (("in_norm", "qkv"), ("post_norm", "gate_up")):
        w = layer[product]
        w.copy_(w.float().mul_(layer[norm].float()))
        layer[norm] = None


def _fuse_layer(weights: dict[str, torch.Tensor], i: int, s: LlamaShape) -> dict:
    """Take layer ``i``'s tensors out of ``weights`` (freeing the unfused copies)."""
    p = f"model.layers.{i}."
    attn, mlp, take = p + "self_attn.", p + "mlp.", weights.pop
    layer = {
        "in_norm": take(p + "input_layernorm.weight"),
        "post_norm": take(p + "post_attention_layernorm.weight"),
        "qkv": torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"]),
        "o": take(attn + "o_proj.weight"),
        "gate_up": torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
        "down": take(mlp + "down_proj.weight"),
    }
    if s.qkv_bias:
        layer["qkv_bias"] = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"])
    if s.qk_norm:
        layer["q_norm"] = take(attn + "q_norm.weight")
        layer["k_norm"] = take(attn + "k_norm.weight")
    return layer


def load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def load_weights(folder: Path, dtype, device) -> dict[str, torch.Tensor]:
    """The safetensors shards of a Hugging Face folder, cast to ``dtype`` on ``device``:
    those its ``model.safetensors.index.json`` names, else ``model*.safetensors``, else
    every ``*.safetensors`` (some folders also hold the same weights in another layout,
    e.g. Mistral's ``consolidated.safetensors``, which would load them twice)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"]
                                                .values()))]
    else:
        files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    weights = {}
    for f in files:
        for name, t in load_file(str(f), device="cpu").items():
            weights[name] = t.to(device=device, dtype=dtype)
    return weights
