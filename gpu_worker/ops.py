"""The decoder's steps besides attention, two ways with one meaning.

:class:`TorchOps` is the reference (any device; the numerics of Transformers' Llama);
:class:`TritonOps` runs the same steps as Triton kernels (CUDA). The elementwise ones round
where the reference rounds; the matrix product sums in another order (so its results agree
to a few half-precision ulps, and with itself bit for bit). The model calls
``ops.<step>`` and never knows which it has:

- ``rms_norm(x, weight, eps) -> y``
- ``add_rms_norm(x, residual, weight, eps) -> (y, residual)``: residual += x in place,
  then y = rms_norm(residual)
- ``silu_and_mul(gate_up) -> silu(gate) * up``
- ``linear(x, w, bias=None) -> x @ w.T + bias``
- ``gate_up_silu(x, gate_up_weight) -> silu_and_mul(linear(x, gate_up_weight))``: the
  MLP's first half (TritonOps may do it in one launch)
- ``linear_add_norm(x, w, residual, norm_weight, eps) -> h``: residual += x @ w.T in
  place, then h = rms_norm(residual), where ``h`` goes only to the two below (TritonOps
  may leave the norm's scaling to them: a :class:`FoldedNorm`)
- ``normed_linear(h, w, bias=None)`` and ``normed_gate_up_silu(h, gate_up_weight)``:
  ``linear`` and ``gate_up_silu`` of such an ``h``
- ``folds_norms(dtype) -> bool``: whether a model of ``dtype`` should move each norm's
  weight into the next product's weight at load (and pass None as the norm's weight)

and the two ends of a static decode step (the runner's, captured in its graph):

- ``decode_inputs(inputs, prev_sampled, rows, num_blocks, scratch_block, block_size,
  out_header) -> (ids, positions, slot_mapping, context_lens, block_tables)``: the model's
  inputs from a decode slot, placeholders filled, padding rows on the scratch block
  (see :func:`gpu_worker.kernels.decode.decode_inputs`)
- ``argmax_into(logits, out)``: greedy samples, first maximum of each row
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from gpu_worker.config import KERNELS
from tandem import slots as S


class TorchOps:
    name = "torch"
    # and rope_(q, k, positions, cos_table, signed_sin_table): rotates q and k in place; the
    # torch attention calls it (Triton attention fuses RoPE into its cache write)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Transformers' LlamaRMSNorm; ``weight`` None: the normed x alone (a model that
        folds the norms keeps each norm's weight in the next product's columns)."""
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return x32.to(x.dtype) if weight is None else weight * x32.to(x.dtype)

    @staticmethod
    def add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
        residual.add_(x)
        return TorchOps.rms_norm(residual, weight, eps), residual

    @staticmethod
    def rope_(q, k, positions, cos_table, signed_sin_table) -> tuple[torch.Tensor, torch.Tensor]:
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign lives in the table
        cos = cos_table[positions].unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = signed_sin_table[positions].unsqueeze(1)
        for x in (q, k):
            half = x.shape[-1] // 2
            x.copy_(x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin)
        return q, k

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up

    linear = staticmethod(F.linear)

    @staticmethod
    def gate_up_silu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        return TorchOps.silu_and_mul(F.linear(x, gate_up_weight))

    @staticmethod
    def linear_add_norm(x, w, residual, norm_weight, eps) -> torch.Tensor:
        return TorchOps.add_rms_norm(F.linear(x, w), residual, norm_weight, eps)[0]

    normed_linear = staticmethod(F.linear)

    @staticmethod
    def folds_norms(dtype: torch.dtype) -> bool:
        """Whether ``linear_add_norm`` may fold norms for a model of ``dtype``: never here."""
        return False

    @staticmethod
    def normed_gate_up_silu(h: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        return TorchOps.gate_up_silu(h, gate_up_weight)

    @staticmethod
    def decode_inputs(inputs, prev_sampled, rows, num_blocks, scratch_block, block_size,
                      out_header) -> tuple[torch.Tensor, ...]:
        header = inputs["header"]
        index = torch.arange(rows, device=header.device)
        valid = index < header[S.H_NUM_ROWS]
        # placeholders: scatter the previous samples; the rows past them aim at a spare entry
        src = inputs["placeholder_src"][:rows].long().clamp(0, prev_sampled.shape[0] - 1)
        target = torch.where(index < header[S.H_NUM_PLACEHOLDERS],
                             inputs["placeholder_pos"][:rows].long().clamp(0, rows), rows)
        ids = inputs["input_ids"][:rows].long()
        ids = torch.cat([ids, ids.new_zeros(1)]).scatter(0, target, prev_sampled[src].long())
        out_header[S.O_SEQ].copy_(header[S.H_SEQ])
        out_header[S.O_NUM_ROWS].copy_(header[S.H_NUM_ROWS])
        long = {name: inputs[name][:rows].long()
                for name in ("positions", "slot_mapping", "context_lens")}
        return (torch.where(valid, ids[:rows], 0),
                torch.where(valid, long["positions"], 0),
                torch.where(valid, long["slot_mapping"], scratch_block * block_size),
                torch.where(valid, long["context_lens"], 1),
                torch.where(valid[:, None], inputs["block_tables"][:rows, :num_blocks].long(),
                            scratch_block))

    @staticmethod
    def argmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(logits.argmax(-1))


# Decode-sized batches: the gate/up product and SiLU-and-mul in one launch of the split-K
# kernel (instead of cuBLAS and a SiLU launch). On an H200 (2026-12-02, Llama-3-8B shape,
# context 1K, `python -m bench.sweep --fuse-silu on|off`): batch 1 4.56 against 4.59 ms a
# step, batch 8 4.70 against 4.74, batch 32 5.55 against 5.59.
FUSE_SILU = True
# Decode-sized batches: each residual add + RMSNorm folded into the products around it (the
# O and down products add the residual and leave sums of squares; the QKV and gate/up
# products finish the norm, their weights carrying the norm's: see LlamaModel): two launches
# a layer fewer. H200, 2026-12-02, Llama-3-8B shape, context 1K (`python -m bench.sweep
# --fold-norms off|on`, A B A B): batch 1 4.41 against 4.30 ms a step, batch 8 4.66 against
# 4.58, batch 32 5.60 against 5.56, batch 64 and 128 level. With the norm's weight applied
# to x inside the products' loops instead, it had lost (batch 32: 6.06 against 5.62).
FOLD_NORMS = True


@dataclasses.dataclass(frozen=True)
class FoldedNorm:
    """``rms_norm(residual, weight, eps)`` not computed yet: ``sums`` [tiles, rows] holds the
    float32 sums of squares of ``residual``'s rows by column tile
    (:func:`gpu_worker.kernels.linear.linear_add`), for the product that consumes it.
    ``weight`` None: the norm's weight is in that product's columns already."""

    residual: torch.Tensor
    weight: torch.Tensor | None
    eps: float
    sums: torch.Tensor


class TritonOps:
    """The fused kernels, and for decode-sized batches the narrow matrix products too: up to
    ``LINEAR_ROWS`` rows and ``LINEAR_MAX_N`` output columns cuBLAS splits K and adds a
    reduce launch, where :mod:`gpu_worker.kernels.linear` reduces inside its one launch.
    ``fuse_silu``: up to ``LINEAR_ROWS`` rows, the gate/up product of any width runs in
    that kernel with SiLU-and-mul in its epilogue.
    ``whole_k``: the plain products' configs (``gpu_worker.kernels.linear.WHOLE_K``).
    ``fold_norms``: up to ``LINEAR_ROWS`` rows, ``linear_add_norm`` adds the residual in the
    product's epilogue and returns a :class:`FoldedNorm`, which ``normed_linear`` and
    ``normed_gate_up_silu`` finish inside their products (of any width); a half-precision
    :class:`gpu_worker.model.LlamaModel` built on these ops moves the norms' weights into
    those products' weights.
    Its counters are this object's: use one per stream (the worker has one compute stream)."""

    name = "triton"
    LINEAR_ROWS, LINEAR_MAX_N = 32, 4096

    def __init__(self, device: torch.device, fuse_silu: bool = FUSE_SILU,
                 fold_norms: bool = FOLD_NORMS, whole_k: bool | None = None) -> None:
        from gpu_worker.kernels import decode, fused, linear, num_sms, shared_memory

        self.rms_norm = fused.rms_norm
        self.add_rms_norm = fused.add_rms_norm
        self.silu_and_mul = fused.silu_and_mul
        self.decode_inputs = decode.decode_inputs
        self.argmax_into = decode.argmax_into
        self._linear = linear
        self._counters = linear.new_counters(torch.device(device))  # before any capture
        self.fuse_silu, self.fold_norms = fuse_silu, fold_norms
        self.whole_k = linear.WHOLE_K if whole_k is None else whole_k
        self._limits = num_sms(torch.device(device)), shared_memory(torch.device(device))

    def folds_norms(self, dtype: torch.dtype) -> bool:
        """Whether ``linear_add_norm`` may fold norms for a model of ``dtype`` (the split-K
        kernel takes half precision only): such a model keeps each norm's weight in the
        next product's (see :class:`gpu_worker.model.LlamaModel`)."""
        return self.fold_norms and dtype in self._linear.DTYPES

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
        lin = self._linear
        if x.shape[0] <= self.LINEAR_ROWS and w.shape[0] <= self.LINEAR_MAX_N and \
                (cfg := self._config(x, w, bias)) is not None:
            return lin.linear(x, w, bias, counters=self._counters, config=cfg)
        return F.linear(x, w, bias)

    def _config(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                gated: bool = False):
        """The split-K kernel's config for the product of x by w (``gated``: the gate/up
        product with SiLU; ``whole_k`` applied to the plain ones), or None where the kernel
        does not take it."""
        cfg = self._linear.default_config(x.shape[0], *w.shape, *self._limits, gated=gated,
                                          whole_k=self.whole_k)
        return cfg if self._linear.supports(x, w, bias, gated, config=cfg) else None

    def gate_up_silu(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        lin = self._linear
        if self.fuse_silu and x.shape[0] <= self.LINEAR_ROWS and \
                (cfg := self._config(x, gate_up_weight, gated=True)) is not None:
            return lin.gate_up_silu(x, gate_up_weight, counters=self._counters, config=cfg)
        return self.silu_and_mul(self.linear(x, gate_up_weight))

    def linear_add_norm(self, x, w, residual, norm_weight, eps) -> torch.Tensor | FoldedNorm:
        lin = self._linear
        if self.fold_norms and x.shape[0] <= self.LINEAR_ROWS and \
                residual.stride(1) == 1 and residual.dtype == x.dtype and \
                (cfg := self._config(x, w)) is not None:
            sums = lin.linear_add(x, w, residual, counters=self._counters, config=cfg)
            return FoldedNorm(residual, norm_weight, eps, sums)
        return self.add_rms_norm(self.linear(x, w), residual, norm_weight, eps)[0]

    def normed_linear(self, h: torch.Tensor | FoldedNorm, w: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(h, FoldedNorm):
            if (cfg := self._config(h.residual, w, bias)) is not None:
                return self._linear.normed_linear(h.residual, h.sums, h.weight, h.eps, w, bias,
                                                  counters=self._counters, config=cfg)
            h = self.rms_norm(h.residual, h.weight, h.eps)
        return self.linear(h, w, bias)

    def normed_gate_up_silu(self, h: torch.Tensor | FoldedNorm,
                            gate_up_weight: torch.Tensor) -> torch.Tensor:
        if isinstance(h, FoldedNorm):
            if (cfg := self._config(h.residual, gate_up_weight, gated=True)) is not None:
                return self._linear.normed_gate_up_silu(h.residual, h.sums, h.weight, h.eps,
                                                        gate_up_weight, counters=self._counters,
                                                        config=cfg)
            h = self.rms_norm(h.residual, h.weight, h.eps)
        return self.gate_up_silu(h, gate_up_weight)


def use_triton(device: torch.device, kind: str) -> bool:
    """Whether ``--kernels kind`` means Triton: ``auto`` on CUDA, or ``triton``."""
    if kind not in KERNELS:
        raise ValueError(f"kernels {kind!r}: choose one of {', '.join(KERNELS)}")
    return kind == "triton" or (kind == "auto" and device.type == "cuda")


def make_ops(device: torch.device, kind: str = "auto") -> TorchOps | TritonOps:
    return TritonOps(device) if use_triton(device, kind) else TorchOps()
