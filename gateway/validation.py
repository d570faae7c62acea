"""Request checks that need no tokenizer: pure functions over a request and the ModelInfo.

Each raises `InvalidRequest(field, message)` naming the field's path (like `sampling.top_p`)
and the limit it breaks. Prompt length needs the tokenizer, so the engine checks it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from gateway.errors import InvalidRequest
from tandem import MAX_ABS_LOGIT_BIAS, MAX_LOGIT_BIAS
from tandem.v1 import generation_pb2 as pb

__all__ = [
    "ALLOWED_ROLES",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_STRINGS",
    "InvalidRequest",
    "validate_generate_request",
    "validate_tokenize_request",
]

ALLOWED_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def validate_generate_request(request: pb.GenerateRequest, info: pb.ModelInfo) -> None:
    """Checks a GenerateRequest against the model's limits."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "one of text, token_ids or messages is required")
    if kind == "text":
        _check_text(request.text)
    elif kind == "token_ids":
        _check_prompt_ids(request.token_ids.ids, info.vocab_size)
    else:
        _check_messages(request.messages)
    _check_sampling(request.sampling, info)


def validate_tokenize_request(request: pb.TokenizeRequest) -> None:
    """Checks a TokenizeRequest (its input only; there is nothing else to check)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "one of text or messages is required")
    if kind == "text":
        _check_text(request.text)
    else:
        _check_messages(request.messages)


def _check_text(text: str) -> None:
    if not text:
        raise InvalidRequest("text", "must not be empty")


def _check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    if not ids:
        raise InvalidRequest("token_ids.ids", "at least one token id is required")
    _check_vocab("token_ids.ids", ids, vocab_size)


def _check_vocab(field: str, ids: Iterable[int], vocab_size: int) -> None:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(
                f"{field}[{i}]",
                f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
            )


def _check_messages(chat: pb.ChatMessages) -> None:
    messages = chat.messages
    if not messages:
        raise InvalidRequest("messages.messages", "at least one message is required")
    if chat.continue_final_message and messages[-1].role != "assistant":
        raise InvalidRequest(
            "messages.continue_final_message",
            f"the last message must be an assistant turn to continue, not {messages[-1].role!r}",
        )
    for i, message in enumerate(messages):
        field = f"messages.messages[{i}]"
        if message.role not in ALLOWED_ROLES:
            raise InvalidRequest(
                f"{field}.role",
                f"{message.role!r} is not one of {', '.join(ALLOWED_ROLES)}",
            )
        if not message.content and message.role != "assistant":
            raise InvalidRequest(
                f"{field}.content",
                f"must not be empty for role {message.role!r} (only assistant turns may be)",
            )


def _check_sampling(sampling: pb.SamplingParams, info: pb.ModelInfo) -> None:
    if sampling.max_tokens > info.max_context_tokens:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"{sampling.max_tokens} exceeds the model's context of "
            f"{info.max_context_tokens} tokens",
        )
    _check_sampler(sampling)
    _check_logit_bias(sampling, info.vocab_size)
    _check_stop(sampling, info.vocab_size)
    _check_logprobs(sampling, info.max_top_logprobs)


def _check_sampler(sampling: pb.SamplingParams) -> None:
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidRequest("sampling.temperature", f"must be finite and >= 0, got {t}")
    if sampling.HasField("top_p"):
        p = sampling.top_p
        if math.isnan(p) or not 0 < p <= 1:
            raise InvalidRequest("sampling.top_p", f"must lie in (0, 1], got {p}")
    if math.isnan(sampling.min_p) or not 0 <= sampling.min_p <= 1:
        raise InvalidRequest("sampling.min_p", f"must lie in [0, 1], got {sampling.min_p}")
    if sampling.top_k < 0:
        raise InvalidRequest(
            "sampling.top_k", f"must be >= 0 (0 means no limit), got {sampling.top_k}"
        )


def _check_logit_bias(sampling: pb.SamplingParams, vocab_size: int) -> None:
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            "sampling.logit_bias",
            f"at most {MAX_LOGIT_BIAS} token ids are allowed, got {len(sampling.logit_bias)}",
        )
    for token_id, bias in sorted(sampling.logit_bias.items()):
        field = f"sampling.logit_bias[{token_id}]"
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(
                field, f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
            )
        if not (math.isfinite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):
            raise InvalidRequest(field, f"the bias must lie in [-{MAX_ABS_LOGIT_BIAS}, "
                                        f"{MAX_ABS_LOGIT_BIAS}], got {bias}")


def _check_stop(sampling: pb.SamplingParams, vocab_size: int) -> None:
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            "sampling.stop",
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(sampling.stop)}",
        )
    for i, stop in enumerate(sampling.stop):
        if not 1 <= len(stop) <= MAX_STOP_STRING_CHARS:
            raise InvalidRequest(
                f"sampling.stop[{i}]",
                f"must be 1 to {MAX_STOP_STRING_CHARS} characters long, got {len(stop)}",
            )
    _check_vocab("sampling.stop_token_ids", sampling.stop_token_ids, vocab_size)


def _check_logprobs(sampling: pb.SamplingParams, max_top_logprobs: int) -> None:
    if sampling.top_logprobs == 0:
        return
    if not sampling.logprobs:
        raise InvalidRequest(
            "sampling.top_logprobs", "requires sampling.logprobs to be set"
        )
    if sampling.top_logprobs > max_top_logprobs:
        raise InvalidRequest(
            "sampling.top_logprobs",
            f"{sampling.top_logprobs} exceeds the limit of {max_top_logprobs}",
        )
