"""Inputs shared by the kernel tests."""

from __future__ import annotations

import dataclasses

import torch


def rope_tables(max_positions, head_dim, dtype, device="cpu"):
    """cos and signed sin as RotaryTable builds them (Llama's default inverse frequencies)."""
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin, half = emb.sin(), head_dim // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return emb.cos().to(device, dtype), signed_sin.to(device, dtype)


@dataclasses.dataclass
class Rope:
    """What an attention backend reads of the model's RotaryTable."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    @classmethod
    def make(cls, max_positions, head_dim, dtype, device="cpu") -> Rope:
        return cls(*rope_tables(max_positions, head_dim, dtype, device))
