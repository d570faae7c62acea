"""The Llama family (Llama, SmolLM, Mistral, Qwen2-style biases) over a paged KV cache.

Weights load from a Hugging Face folder (safetensors) or come from a seeded
random generator (benchmark presets). Q/K/V and gate/up projections are fused
at load time, so a layer reads each weight matrix once per step. The numerics
follow Transformers' implementation (RMSNorm in float32, RoPE tables in float32),
so greedy output matches ``generate()`` on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_worker.attention import AttentionBackend, AttentionMetadata


class LlamaShape:
    """The numbers of a Llama-family config that the model code needs."""

    def __init__(self, config) -> None:
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
        self.max_positions = config.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


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

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each token, [num_tokens, 1, head_dim]: once per forward."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class LlamaModel:
    """Weights as plain tensors and a forward pass over a flat batch of tokens."""

    def __init__(self, config, weights: dict[str, torch.Tensor], dtype, device) -> None:
        self.shape = s = LlamaShape(config)
        self.dtype, self.device = dtype, device
        self.embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.lm_head = self.embed if s.tied else weights["lm_head.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.layers = [_fuse_layer(weights, i, s) for i in range(s.num_layers)]
        self.rope = RotaryTable(config, s.max_positions, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        meta: AttentionMetadata,
        attention: AttentionBackend,
        sample_index: torch.Tensor,  # [num_rows], the token whose logits each row samples
    ) -> torch.Tensor:  # [num_rows, vocab] float32 logits
        s = self.shape
        hidden = F.embedding(input_ids, self.embed)
        rope = self.rope.lookup(meta.positions)
        for i, w in enumerate(self.layers):
            h = rms_norm(hidden, w["in_norm"], s.eps)
            hidden = hidden + self._attention(i, w, h, meta, attention, rope)
            h = rms_norm(hidden, w["post_norm"], s.eps)
            gate, up = F.linear(h, w["gate_up"]).split(s.intermediate, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w["down"])
        last = rms_norm(hidden[sample_index], self.final_norm, s.eps)
        return F.linear(last, self.lm_head).float()

    def _attention(self, i, w, h, meta: AttentionMetadata, attention: AttentionBackend, rope):
        s = self.shape
        qkv = F.linear(h, w["qkv"], w.get("qkv_bias"))
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = self.rope.apply(q.view(-1, s.num_heads, s.head_dim), *rope)
        k = self.rope.apply(k.view(-1, s.num_kv_heads, s.head_dim), *rope)
        out = attention.forward(i, q, k, v.view(-1, s.num_kv_heads, s.head_dim), meta)
        return F.linear(out.reshape(-1, s.q_size), w["o"])


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
    return layer


def load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def load_weights(folder: Path, dtype, device) -> dict[str, torch.Tensor]:
    """All safetensors shards of a Hugging Face folder, cast to ``dtype`` on ``device``."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    weights = {}
    for f in files:
        for name, t in load_file(str(f), device="cpu").items():
            weights[name] = t.to(device=device, dtype=dtype)
    return weights
