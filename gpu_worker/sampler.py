"""Per-row sampling: logit biases, penalties, bans, greedy, temperature, top-k, top-p,
min-p, with reproducible seeds.

Randomness is counter-based: the noise for row ``b`` is a hash of
``(seed[b], position of the token being sampled, vocabulary index)``. A request's
tokens therefore depend only on its own seed and context, never on which other
requests share the batch or on how often it was preempted and recomputed. The
draw is the Gumbel-max trick: ``argmax(logits / T + Gumbel noise)`` samples from
``softmax(logits / T)`` over the tokens that survive top-k, top-p and min-p.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

_M1 = 0x9E3779B97F4A7C15 - (1 << 64)  # as signed int64
_M2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M3 = 0x94D049BB133111EB - (1 << 64)


@dataclasses.dataclass
class Penalties:
    history: torch.Tensor  # [rows, n] int64: each row's tokens so far (< 0: padding)
    prompt_lens: torch.Tensor  # [rows] int64: the first prompt_lens tokens are the prompt
    repetition: torch.Tensor  # [rows] float32, 1: off (over prompt and output)
    presence: torch.Tensor  # [rows] float32, 0: off (over output)
    frequency: torch.Tensor  # [rows] float32, 0: off (over output)


@dataclasses.dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [rows] float32, 0 = greedy
    top_p: torch.Tensor  # [rows] float32, 1 = off
    top_k: torch.Tensor  # [rows] int64, 0 = off
    seed: torch.Tensor  # [rows] int64
    position: torch.Tensor  # [rows] int64, position of the token being sampled
    num_top_logprobs: int  # largest top-N any row wants (0: none)
    want_logprobs: bool
    all_greedy: bool  # host-side flags, so that the device is never asked
    any_truncation: bool
    banned_ids: torch.Tensor | None = None  # [rows, n] int, -1 padded; None: nothing banned
    min_p: torch.Tensor | None = None  # [rows] float32, 0 = off; None: off for every row
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # ids [rows, n] (-1 padded), values
    penalties: Penalties | None = None


@dataclasses.dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor | None  # [rows] float32, of the sampled token
    top_ids: torch.Tensor | None  # [rows, n] int64
    top_logprobs: torch.Tensor | None  # [rows, n] float32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (shifts masked to act as logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M2
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M3
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 in (0, 1), a pure function of (seed, position, index).

    23 random bits: ``k + 0.5`` is then exact in float32, and the largest value is 1 -
    2**-24. (With 24, k = 2**24 - 1 rounded to 1.0, whose Gumbel noise is +inf: a drawn
    row then took a random token, or one that top-k, top-p or a ban had removed, -inf +
    inf being NaN, which argmax picks.)"""
    index = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    key = _mix(seed * _M1 + position * _M2)  # [rows]
    bits = _mix(key[:, None] + index[None, :] * _M1)
    return (((bits >> 41) & 0x7FFFFF).to(torch.float32) + 0.5) / float(1 << 23)


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set the logits outside each row's top-k / top-p set to -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    drop |= (before >= top_p[:, None]) & (top_p[:, None] < 1)  # keeps the top token
    dropped = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(dropped, float("-inf"))


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set the logits of the tokens less likely than min_p times the row's most likely
    one to -inf: p < min_p * p_max is logit < max + log(min_p) (-inf at 0: none dropped)."""
    floor = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < floor, float("-inf"))


def _columns(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token ids as columns of the logits padded by one spare column: padding (< 0) and ids
    outside the vocabulary land on the spare one, which is cut off again."""
    return torch.where((ids >= 0) & (ids < vocab), ids.long(), vocab)


def _ban(logits: torch.Tensor, banned_ids: torch.Tensor) -> torch.Tensor:
    """Set each row's banned tokens to -inf."""
    vocab = logits.shape[-1]
    padded = F.pad(logits, (0, 1))
    return padded.scatter(-1, _columns(banned_ids, vocab), float("-inf"))[:, :vocab]


def _add_bias(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add each row's biases to its logits."""
    vocab = logits.shape[-1]
    padded = F.pad(logits, (0, 1))
    return padded.scatter_add(-1, _columns(ids, vocab), values)[:, :vocab]


def _penalise(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition penalty over all tokens so far; presence/frequency over the output."""
    rows, vocab = logits.shape
    valid = p.history >= 0
    index = torch.where(valid, p.history, vocab)
    is_output = valid & (torch.arange(p.history.shape[1], device=logits.device)[None, :]
                         >= p.prompt_lens[:, None])
    ones = torch.ones_like(index, dtype=logits.dtype)
    seen = logits.new_zeros(rows, vocab + 1).scatter_add_(1, index, ones)[:, :vocab] > 0
    counts = logits.new_zeros(rows, vocab + 1).scatter_add_(
        1, torch.where(is_output, p.history, vocab), ones)[:, :vocab]
    rep = p.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - p.presence[:, None] * (counts > 0) - p.frequency[:, None] * counts


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [rows, vocab], sampled in float32. Logprobs describe the distribution before
    biases, penalties, bans, temperature, top-k, top-p and min-p."""
    logits = raw = logits.float()
    if batch.bias is not None:
        logits = _add_bias(logits, *batch.bias)
    if batch.penalties is not None:
        logits = _penalise(logits, batch.penalties)
    if batch.banned_ids is not None:
        logits = _ban(logits, batch.banned_ids)
    sampled = logits.argmax(-1)
    if not batch.all_greedy:
        greedy = batch.temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, batch.temperature)[:, None]
        if batch.any_truncation:
            scaled = _truncate(scaled, batch.top_k, batch.top_p)
        if batch.min_p is not None:
            scaled = _min_p(scaled, batch.min_p)
        noise = uniform_noise(batch.seed, batch.position, logits.shape[-1])
        drawn = (scaled - torch.log(-torch.log(noise))).argmax(-1)
        sampled = torch.where(greedy, sampled, drawn)
    out = SamplerOutput(sampled, None, None, None)
    if batch.want_logprobs or batch.num_top_logprobs:
        logprobs = raw.log_softmax(dim=-1)
        out.logprobs = logprobs.gather(-1, sampled[:, None]).squeeze(-1)
        if batch.num_top_logprobs:
            out.top_logprobs, out.top_ids = logprobs.topk(batch.num_top_logprobs, dim=-1)
    return out
