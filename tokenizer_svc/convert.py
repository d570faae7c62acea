"""Protobuf at the edge: public request → internal types, internal output → protobuf."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from jinja2 import TemplateError, TemplateSyntaxError

from tandem import MAX_ABS_LOGIT_BIAS, slots
from tandem.v1 import generation_pb2 as pb
from tokenizer_svc.request import FinishReason, RequestOutput, SamplingOptions, ending_eos
from tokenizer_svc.tokenization import ModelTokenizer

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message names the field and the limit."""


def prompt_ids(request: pb.GenerateRequest | pb.TokenizeRequest, tok: ModelTokenizer):
    """The prompt's token ids, tokenized as the request's input kind says."""
    kind = request.WhichOneof("input")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("text: the prompt is empty")
        return tok.encode_text(request.text)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if not ids or bad:
            raise InvalidRequest(
                f"token_ids: {'empty' if not ids else f'id {bad[0]}'}; ids must lie in "
                f"[0, {tok.vocab_size})")
        return ids
    if kind == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        if not messages:
            raise InvalidRequest("messages: at least one message is required")
        if not tok.has_chat_template:
            raise InvalidRequest("messages: the model has no chat template; send the prompt "
                                 "as text or token_ids")
        continue_final = request.messages.continue_final_message
        if continue_final and messages[-1]["role"] != "assistant":
            raise InvalidRequest("messages.continue_final_message: the last message must be "
                                 f"an assistant turn to continue, not {messages[-1]['role']!r}")
        try:
            return tok.encode_chat(messages, continue_final)
        except TemplateSyntaxError:  # the model folder's fault, not the request's
            raise
        except TemplateError as exc:  # the template's raise_exception: roles it refuses
            raise InvalidRequest(f"messages: the model's chat template refuses them: {exc}") \
                from None
    raise InvalidRequest("input: one of text, token_ids or messages is required")


def sampling_options(sp: pb.SamplingParams, num_prompt: int, max_context: int,
                     default_max_tokens: int, eos_token_ids: frozenset[int],
                     cache_tokens: int | None = None,
                     max_top_logprobs: int | None = None) -> SamplingOptions:
    """Checks what needs the prompt's length (and the model's EOS ids) and fills in the
    defaults. `cache_tokens`: the most tokens' KV one request may hold (None: no limit); an
    unset max_tokens is shortened to it as well as to the context. `max_top_logprobs`: the
    most top_logprobs a slot holds (the gateway checks it too; the engine's own API must)."""
    room = max_context - num_prompt
    if room < 1:
        raise InvalidRequest(
            f"prompt: {num_prompt} tokens leave no room to generate in the context of "
            f"{max_context} tokens (max_context_tokens)")
    if sp.max_tokens > room:
        raise InvalidRequest(
            f"sampling.max_tokens: the prompt ({num_prompt} tokens) plus max_tokens "
            f"{sp.max_tokens} exceed the context of {max_context} tokens")
    default = min(default_max_tokens, room)
    if cache_tokens is not None:  # the last token's KV is never written: prompt + n - 1
        if num_prompt > cache_tokens:
            raise InvalidRequest(
                f"prompt: {num_prompt} tokens need more KV than the cache holds "
                f"({cache_tokens} tokens)")
        default = min(default, cache_tokens - num_prompt + 1)
    max_tokens = sp.max_tokens or default
    if cache_tokens is not None and num_prompt + max_tokens - 1 > cache_tokens:
        raise InvalidRequest(
            f"sampling.max_tokens: the prompt ({num_prompt} tokens) and max_tokens "
            f"{max_tokens} need the KV of {num_prompt + max_tokens - 1} tokens, more than the "
            f"KV cache holds ({cache_tokens} tokens)")
    if sp.min_tokens > max_tokens:
        raise InvalidRequest(f"sampling.min_tokens: {sp.min_tokens} exceeds max_tokens "
                             f"({max_tokens})")
    if sp.min_tokens:
        _check_banned(sp, eos_token_ids)
    _check_penalties(sp)
    _check_logit_bias(sp)
    if max_top_logprobs is not None and sp.logprobs and sp.top_logprobs > max_top_logprobs:
        raise InvalidRequest(f"sampling.top_logprobs: {sp.top_logprobs} exceeds the limit of "
                             f"{max_top_logprobs}")
    return SamplingOptions(
        max_tokens=max_tokens,
        min_tokens=sp.min_tokens,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k,
        min_p=sp.min_p,
        logit_bias=tuple(sorted(sp.logit_bias.items())),
        seed=_seed(sp.seed) if sp.HasField("seed") else random.getrandbits(63),
        stop=tuple(sp.stop),
        stop_token_ids=frozenset(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
        top_logprobs=sp.top_logprobs if sp.logprobs else 0,
    )


def _check_banned(sp: pb.SamplingParams, eos_token_ids: frozenset[int]) -> None:
    """Until min_tokens, the ids that would end the request (EOS unless ignore_eos, and the
    stop_token_ids) are banned; a row bans so many."""
    eos = ending_eos(eos_token_ids, sp.ignore_eos)
    num_banned = len(eos | set(sp.stop_token_ids))
    if num_banned > slots.MAX_BANNED_IDS:
        ends = (f"the stop_token_ids and the model's {len(eos)} EOS ids make" if eos
                else "the stop_token_ids are")
        raise InvalidRequest(
            f"sampling.stop_token_ids: with min_tokens, {ends} {num_banned} distinct ids, "
            f"more than the {slots.MAX_BANNED_IDS} that can be banned until min_tokens is "
            "reached")


def _check_penalties(sp: pb.SamplingParams) -> None:
    if sp.HasField("repetition_penalty") and not (
            math.isfinite(sp.repetition_penalty) and sp.repetition_penalty > 0):
        raise InvalidRequest(f"sampling.repetition_penalty: {sp.repetition_penalty} must be a "
                             "finite number > 0")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        if not (math.isfinite(value) and -2 <= value <= 2):
            raise InvalidRequest(f"sampling.{name}: {value} must lie in [-2, 2]")


def _check_logit_bias(sp: pb.SamplingParams) -> None:
    """What a slot holds and the worker can add (the gateway also checks the ids against
    the vocabulary; the worker drops ids outside it)."""
    if len(sp.logit_bias) > slots.MAX_LOGIT_BIAS:
        raise InvalidRequest(f"sampling.logit_bias: {len(sp.logit_bias)} ids, more than the "
                             f"{slots.MAX_LOGIT_BIAS} allowed")
    for token_id, bias in sorted(sp.logit_bias.items()):
        if not (math.isfinite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):
            raise InvalidRequest(f"sampling.logit_bias[{token_id}]: {bias} must lie in "
                                 f"[-{MAX_ABS_LOGIT_BIAS}, {MAX_ABS_LOGIT_BIAS}]")


def _seed(seed: int) -> int:
    """A uint64 seed as the int64 the sampler hashes."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _unnamed(token_id: int) -> str:
    return ""


def output_to_pb(out: RequestOutput, request_id: str,
                 msg: pb.GenerateStreamResponse | None = None,
                 token_text: Callable[[int], str] | None = None) -> pb.GenerateStreamResponse:
    """``out`` as the public API's stream message, filled into ``msg`` if given (a field of
    an enclosing message: no copy); logprobs name their tokens with ``token_text``."""
    if msg is None:
        msg = pb.GenerateStreamResponse()
    msg.text, msg.request_id = out.text, request_id
    msg.token_ids.extend(out.token_ids)
    name = token_text or _unnamed
    for lp in out.logprobs:
        entry = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                                 token=name(lp.token_id))
        for token_id, logprob in lp.top:
            entry.top.add(token_id=token_id, logprob=logprob, token=name(token_id))
    if out.finish_reason is not None:
        msg.finish_reason = _FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.usage.cached_prompt_tokens = out.cached_prompt_tokens
        msg.timing.queue_seconds = out.queue_seconds
        msg.timing.first_token_seconds = out.first_token_seconds
        msg.timing.total_seconds = out.total_seconds
    return msg
