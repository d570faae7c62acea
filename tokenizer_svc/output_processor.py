"""Applies a sampled token to its request: append, stop rules, text delta."""

from __future__ import annotations

import time

from tokenizer_svc.detokenizer import Detokenizer, StopStringMatcher, detokenizer_factory
from tokenizer_svc.request import FinishReason, Request, RequestOutput, TokenLogprob


class OutputState:
    """The per-request text state: detokenizer and stop-string matcher."""

    def __init__(self, req: Request, detok: Detokenizer) -> None:
        self.detok = detok
        self.stops = StopStringMatcher(req.options.stop)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_context: int) -> None:
        self.new_detokenizer = detokenizer_factory(tokenizer)  # checks its table once, here
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.states: dict[str, OutputState] = {}

    def add(self, req: Request) -> None:
        self.states[req.req_id] = OutputState(req, self.new_detokenizer())

    def discard(self, req: Request) -> None:
        self.states.pop(req.req_id, None)

    def apply(self, req: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Append ``token_id`` to ``req``; sets ``req.finish_reason`` when it ends."""
        now = time.monotonic()
        req.output_ids.append(token_id)
        if req.first_token is None:
            req.first_token = now
        state = self.states[req.req_id]
        out = RequestOutput(req.req_id, token_ids=[token_id],
                            logprobs=[logprob] if logprob else [])
        if self._is_stop_token(req, token_id):
            req.finish_reason = FinishReason.STOP
        else:
            out.text = state.stops.feed(state.detok.add(token_id))
            if state.stops.stopped:
                req.finish_reason = FinishReason.STOP
        if req.finish_reason is None and (
            len(req.output_ids) >= req.options.max_tokens or req.num_known >= self.max_context
        ):
            req.finish_reason = FinishReason.LENGTH
        if req.finish_reason is not None:
            if not state.stops.stopped:
                out.text += state.stops.feed(state.detok.flush()) + state.stops.flush()
            self._finish(req, out, now)
        return out

    def _is_stop_token(self, req: Request, token_id: int) -> bool:
        opts = req.options
        return token_id in opts.stop_token_ids or (
            not opts.ignore_eos and token_id in self.eos_token_ids
        )

    def _finish(self, req: Request, out: RequestOutput, now: float) -> None:
        out.finish_reason = req.finish_reason
        out.prompt_tokens = len(req.prompt_ids)
        out.completion_tokens = len(req.output_ids)
        out.cached_prompt_tokens = req.cached_prompt_tokens or 0
        out.queue_seconds = (req.first_scheduled or now) - req.arrival
        out.first_token_seconds = (req.first_token or now) - req.arrival
        out.total_seconds = now - req.arrival
        self.discard(req)
