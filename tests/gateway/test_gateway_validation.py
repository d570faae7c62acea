"""Every validation rule, without a server."""

from __future__ import annotations

import math

import pytest

from gateway.validation import (
    InvalidRequest,
    validate_generate_request,
    validate_tokenize_request,
)
from tandem.v1 import generation_pb2 as pb

INFO = pb.ModelInfo(model="m", vocab_size=100, max_context_tokens=512, max_top_logprobs=5)


def text_request(**sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(**sampling))


def chat(*turns: tuple[str, str]) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role=role, content=content) for role, content in turns]
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=messages))


def rejected(request: pb.GenerateRequest, info: pb.ModelInfo = INFO) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        validate_generate_request(request, info)
    return caught.value


@pytest.mark.parametrize(
    "request_",
    [
        pb.GenerateRequest(text="hello"),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[0, 5, 99])),
        chat(("system", "be brief"), ("user", "hi"), ("assistant", ""), ("tool", "42")),
        text_request(max_tokens=512, temperature=0.0, top_p=1.0, top_k=0,
                     stop=["x" * 256] * 16, stop_token_ids=[0, 99], logprobs=True,
                     top_logprobs=5),
        text_request(temperature=2.5, top_p=1e-6, top_k=50, logprobs=True),
    ],
)
def test_valid_requests_pass(request_: pb.GenerateRequest) -> None:
    validate_generate_request(request_, INFO)


def test_missing_input() -> None:
    error = rejected(pb.GenerateRequest())
    assert error.field == "input"
    assert str(error) == "input: one of text, token_ids or messages is required"


def test_empty_text() -> None:
    # An explicitly set empty string selects the `text` case of the oneof.
    request = pb.GenerateRequest(text="")
    assert request.WhichOneof("input") == "text"
    error = rejected(request)
    assert str(error) == "text: must not be empty"


def test_empty_token_ids() -> None:
    error = rejected(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])))
    assert error.field == "token_ids.ids"
    assert "at least one" in error.message


@pytest.mark.parametrize("bad_id, index", [(100, 2), (-1, 1), (2**31 - 1, 0)])
def test_token_id_outside_vocabulary(bad_id: int, index: int) -> None:
    ids = [1, 2, 3]
    ids[index] = bad_id
    error = rejected(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)))
    assert error.field == f"token_ids.ids[{index}]"
    assert str(bad_id) in error.message and "[0, 100)" in error.message


def test_empty_messages() -> None:
    error = rejected(pb.GenerateRequest(messages=pb.ChatMessages()))
    assert error.field == "messages.messages"
    assert "at least one message" in error.message


@pytest.mark.parametrize("role", ["bot", "", "User", "function"])
def test_unknown_role(role: str) -> None:
    error = rejected(chat(("user", "hi"), (role, "hello")))
    assert error.field == "messages.messages[1].role"
    assert repr(role) in error.message
    assert "system, user, assistant, tool" in error.message


@pytest.mark.parametrize("role", ["system", "user", "tool"])
def test_empty_content_outside_assistant(role: str) -> None:
    error = rejected(chat(("user", "hi"), ("assistant", ""), (role, "")))
    assert error.field == "messages.messages[2].content"
    assert "must not be empty" in error.message


def test_continuing_the_final_message_needs_an_assistant_turn_last() -> None:
    request = chat(("user", "hi"), ("assistant", "{"))
    request.messages.continue_final_message = True
    validate_generate_request(request, INFO)
    request.messages.messages.pop()
    error = rejected(request)
    assert error.field == "messages.continue_final_message" and "'user'" in error.message


def test_max_tokens_over_context() -> None:
    validate_generate_request(text_request(max_tokens=512), INFO)
    error = rejected(text_request(max_tokens=513))
    assert error.field == "sampling.max_tokens"
    assert "513" in error.message and "512" in error.message


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf, -0.1])
def test_bad_temperature(temperature: float) -> None:
    error = rejected(text_request(temperature=temperature))
    assert error.field == "sampling.temperature"
    assert ">= 0" in error.message


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, math.nan, math.inf])
def test_bad_top_p(top_p: float) -> None:
    error = rejected(text_request(top_p=top_p))
    assert error.field == "sampling.top_p"
    assert "(0, 1]" in error.message


def test_top_p_unset_is_fine() -> None:
    request = text_request()
    assert not request.sampling.HasField("top_p")
    validate_generate_request(request, INFO)


def test_negative_top_k() -> None:
    error = rejected(text_request(top_k=-1))
    assert error.field == "sampling.top_k"
    assert ">= 0" in error.message


@pytest.mark.parametrize("min_p", [-0.1, 1.5, float("nan")])
def test_min_p_outside_zero_one(min_p: float) -> None:
    error = rejected(text_request(min_p=min_p))
    assert error.field == "sampling.min_p"
    assert "[0, 1]" in error.message


@pytest.mark.parametrize("min_p", [0.0, 0.05, 1.0])
def test_min_p_in_zero_one_is_fine(min_p: float) -> None:
    validate_generate_request(text_request(temperature=1.0, min_p=min_p), INFO)


def test_logit_bias_rules() -> None:
    validate_generate_request(text_request(logit_bias={0: -100.0, 99: 100.0, 5: 0.5}), INFO)
    error = rejected(text_request(logit_bias={i: 1.0 for i in range(65)}))
    assert error.field == "sampling.logit_bias" and "at most 64" in error.message
    error = rejected(text_request(logit_bias={3: 1.0, 100: 1.0}))
    assert error.field == "sampling.logit_bias[100]" and "[0, 100)" in error.message
    for bias in (float("nan"), -101.0):
        error = rejected(text_request(logit_bias={7: bias}))
        assert error.field == "sampling.logit_bias[7]" and "[-100, 100]" in error.message


def test_too_many_stop_strings() -> None:
    error = rejected(text_request(stop=["a"] * 17))
    assert error.field == "sampling.stop"
    assert "16" in error.message and "17" in error.message


@pytest.mark.parametrize("stop, length", [("", 0), ("y" * 257, 257)])
def test_bad_stop_string(stop: str, length: int) -> None:
    error = rejected(text_request(stop=["ok", stop]))
    assert error.field == "sampling.stop[1]"
    assert "1 to 256" in error.message and str(length) in error.message


@pytest.mark.parametrize("bad_id", [100, -3])
def test_stop_token_id_outside_vocabulary(bad_id: int) -> None:
    error = rejected(text_request(stop_token_ids=[5, bad_id]))
    assert error.field == "sampling.stop_token_ids[1]"
    assert str(bad_id) in error.message and "[0, 100)" in error.message


def test_top_logprobs_over_limit() -> None:
    error = rejected(text_request(logprobs=True, top_logprobs=6))
    assert error.field == "sampling.top_logprobs"
    assert "6" in error.message and "limit of 5" in error.message


def test_top_logprobs_without_logprobs() -> None:
    error = rejected(text_request(top_logprobs=1))
    assert error.field == "sampling.top_logprobs"
    assert "sampling.logprobs" in error.message


def test_top_logprobs_with_model_that_allows_none() -> None:
    info = pb.ModelInfo(vocab_size=100, max_context_tokens=512, max_top_logprobs=0)
    validate_generate_request(text_request(logprobs=True), info)
    error = rejected(text_request(logprobs=True, top_logprobs=1), info)
    assert "limit of 0" in error.message


def test_message_starts_with_the_field() -> None:
    error = rejected(text_request(top_k=-5))
    assert str(error).startswith("sampling.top_k: ")


def test_tokenize_rules() -> None:
    validate_tokenize_request(pb.TokenizeRequest(text="hi"))
    with pytest.raises(InvalidRequest, match="^input: one of text or messages is required$"):
        validate_tokenize_request(pb.TokenizeRequest())
    request = pb.TokenizeRequest()
    request.text = ""
    with pytest.raises(InvalidRequest, match="^text: "):
        validate_tokenize_request(request)
    bad_role = pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])
    with pytest.raises(InvalidRequest, match=r"^messages\.messages\[0\]\.role: "):
        validate_tokenize_request(pb.TokenizeRequest(messages=bad_role))
