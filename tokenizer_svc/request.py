"""Per-request state inside the engine, and what the engine streams back. No torch."""

from __future__ import annotations

import dataclasses
import enum
from collections import deque


class Status(enum.Enum):
    WAITING = "waiting"  # queued for its (re)prefill; holds no KV blocks
    RUNNING = "running"  # holds KV blocks; scheduled every step until done
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the end of the context
    ABORTED = "aborted"  # cancelled by the client, or the engine failed


def ending_eos(eos_token_ids: frozenset[int], ignore_eos: bool) -> frozenset[int]:
    """The model's EOS ids that end a request: none under ignore_eos."""
    return frozenset() if ignore_eos else eos_token_ids


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """A request's sampling parameters, validated and with defaults filled in."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0  # until then EOS and stop_token_ids are banned
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request (a diff, not the whole state)."""

    req_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    queue_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    error: str | None = None  # set when the engine failed the request
    error_code: str = "UNAVAILABLE"  # the gRPC status of `error`, by name

    def extend(self, later: RequestOutput) -> None:
        """Append ``later`` (the same request's next output): one delta for both."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        if later.finish_reason is not None or later.error is not None:
            for field in ("finish_reason", "prompt_tokens", "completion_tokens",
                          "cached_prompt_tokens",
                          "queue_seconds", "first_token_seconds", "total_seconds", "error"):
                setattr(self, field, getattr(later, field))


@dataclasses.dataclass(eq=False)
class Request:
    """A request as the scheduler sees it.

    ``num_computed`` counts the tokens whose KV has been written or is being
    written by a scheduled batch. ``pending`` holds, for each sampled token still
    in flight, the ``(batch seq, row)`` that will produce it: such a token is
    already part of the sequence (``num_total``) but its id is not known yet, so
    a batch that needs it as input carries a placeholder.
    """

    req_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    arrival: float
    priority: int = 0  # higher is scheduled first (see tokenizer_svc.scheduler)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    pending: deque[tuple[int, int]] = dataclasses.field(default_factory=deque)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    first_scheduled: float | None = None
    cached_prompt_tokens: int | None = None  # from the prefix cache, at first admission
    num_admissions: int = 0  # times taken from the queue (1 + preemptions so far)
    block_digests: list[bytes] = dataclasses.field(default_factory=list)  # prefix caching:
    # the digests of its first whole blocks of tokens, as far as computed (its only copy)
    first_token: float | None = None
    last_token_at: float = 0.0  # when the latest token was applied

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_total(self) -> int:
        return self.num_known + len(self.pending)

    @property
    def wants_more_tokens(self) -> bool:
        """True while the scheduler should still produce samples for it."""
        n = len(self.output_ids) + len(self.pending)
        return self.status != Status.FINISHED and n < self.options.max_tokens

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def known_ids(self, start: int, stop: int) -> list[int]:
        """Token ids in ``[start, min(stop, num_known))``."""
        n = len(self.prompt_ids)
        stop = min(stop, self.num_known)
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:n] + self.output_ids[max(start - n, 0) : stop - n]
