"""One batch from a slot to sampled tokens: read inputs, fill placeholders, run, sample."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gpu_worker.attention import AttentionBackend, AttentionMetadata
from gpu_worker.model import LlamaModel
from gpu_worker.sampler import SamplerOutput, SamplingBatch, sample
from tandem import slots as S


@dataclasses.dataclass
class DeviceBatch:
    """A batch's inputs on the device."""

    seq: int
    prev_seq: int
    input_ids: torch.Tensor  # [num_tokens] int64 (placeholders: -1)
    placeholder_pos: torch.Tensor  # [num_placeholders] int64, index into input_ids
    placeholder_src: torch.Tensor  # [num_placeholders] int64, row of prev batch's output
    meta: AttentionMetadata
    sample_index: torch.Tensor  # [num_rows] int64, last token of each row
    sampling: SamplingBatch


def _ints(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(a).to(device=device, dtype=torch.int64)


def _floats(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(a.copy()).to(device=device)


def read_batch(view: S.SlotView, device: torch.device) -> DeviceBatch:
    """Copy slot ``view``'s inputs to ``device``; the slot may be rewritten afterwards."""
    h = view.header
    n_tok, n_rows, n_ph = int(h[S.H_NUM_TOKENS]), int(h[S.H_NUM_ROWS]), int(h[S.H_NUM_PLACEHOLDERS])
    query_start = _ints(view.query_start[: n_rows + 1], device)
    context_lens = _ints(view.context_lens[:n_rows], device)
    row_lens = query_start[1:] - query_start[:-1]
    meta = AttentionMetadata(
        positions=_ints(view.positions[:n_tok], device),
        slot_mapping=_ints(view.slot_mapping[:n_tok], device),
        query_start=query_start,
        context_lens=context_lens,
        block_tables=_ints(view.block_tables[:n_rows], device),
        token_rows=torch.repeat_interleave(torch.arange(n_rows, device=device), row_lens),
        max_query_len=int(h[S.H_MAX_QUERY_LEN]),
        max_context_len=int(h[S.H_MAX_CONTEXT_LEN]),
    )
    temperature, top_p = view.temperature[:n_rows], view.top_p[:n_rows]
    top_k = view.top_k[:n_rows]
    sampling = SamplingBatch(
        temperature=_floats(temperature, device),
        top_p=_floats(top_p, device),
        top_k=_ints(top_k, device),
        seed=_ints(view.seed[:n_rows], device),
        position=context_lens,
        num_top_logprobs=int(h[S.H_NUM_TOP_LOGPROBS]),
        want_logprobs=bool(h[S.H_WANT_LOGPROBS]),
        all_greedy=bool((temperature <= 0).all()),
        any_truncation=bool(((top_k > 0) | (top_p < 1)).any()),
    )
    return DeviceBatch(
        seq=int(h[S.H_SEQ]),
        prev_seq=int(h[S.H_PREV_SEQ]),
        input_ids=_ints(view.input_ids[:n_tok], device),
        placeholder_pos=_ints(view.placeholder_pos[:n_ph], device),
        placeholder_src=_ints(view.placeholder_src[:n_ph], device),
        meta=meta,
        sample_index=query_start[1:] - 1,
        sampling=sampling,
    )


class ModelRunner:
    """Runs batches in order, keeping the last batch's sampled tokens on the device
    so that the next batch's placeholders can be filled without a host round trip."""

    def __init__(self, model: LlamaModel, attention: AttentionBackend) -> None:
        self.model = model
        self.attention = attention
        self.prev_seq = 0
        self.prev_sampled: torch.Tensor | None = None  # [rows] int64

    @torch.inference_mode()
    def run(self, batch: DeviceBatch) -> SamplerOutput:
        self._fill_placeholders(batch)
        logits = self.model.forward(batch.input_ids, batch.meta, self.attention,
                                    batch.sample_index)
        out = sample(logits, batch.sampling)
        self.prev_seq, self.prev_sampled = batch.seq, out.token_ids
        return out

    def _fill_placeholders(self, batch: DeviceBatch) -> None:
        if batch.placeholder_pos.numel() == 0:
            return
        if batch.prev_seq != self.prev_seq or self.prev_sampled is None:
            raise RuntimeError(
                f"batch {batch.seq} has placeholders for batch {batch.prev_seq}, "
                f"but the last batch run was {self.prev_seq}"
            )
        batch.input_ids[batch.placeholder_pos] = self.prev_sampled[batch.placeholder_src]


def write_outputs(view: S.SlotView, seq: int, out: SamplerOutput) -> None:
    """Copy a batch's sampled tokens (and logprobs) into the slot's output area."""
    n = out.token_ids.shape[0]
    view.sampled_ids[:n] = out.token_ids.cpu().numpy()
    if out.logprobs is not None:
        view.logprobs[:n] = out.logprobs.cpu().numpy()
    if out.top_ids is not None:
        k = out.top_ids.shape[1]
        view.top_ids[:n, :k] = out.top_ids.cpu().numpy()
        view.top_logprobs[:n, :k] = out.top_logprobs.cpu().numpy()
    view.out_header[S.O_NUM_ROWS] = n
    view.out_header[S.O_SEQ] = seq
