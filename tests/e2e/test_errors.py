"""Bad input gets INVALID_ARGUMENT naming the field and the limit, and disturbs
no other request."""

from __future__ import annotations

import threading

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.e2e


def chat(*pairs):
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])


def sp(**kw):
    return pb.SamplingParams(**kw)


CASES = {
    "no input": (pb.GenerateRequest(), "input"),
    "empty prompt": (pb.GenerateRequest(text=""), "text"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids"),
    "token id too large": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**8])),
                           "token_ids"),
    "negative token id": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "token_ids"),
    "max_tokens beyond context": (pb.GenerateRequest(text="hi", sampling=sp(max_tokens=10**6)),
                                  "max_tokens"),
    "negative temperature": (pb.GenerateRequest(text="hi", sampling=sp(temperature=-0.5)),
                             "temperature"),
    "nan temperature": (pb.GenerateRequest(text="hi", sampling=sp(temperature=float("nan"))),
                        "temperature"),
    "top_p zero": (pb.GenerateRequest(text="hi", sampling=sp(top_p=0.0)), "top_p"),
    "top_p above one": (pb.GenerateRequest(text="hi", sampling=sp(top_p=1.5)), "top_p"),
    "negative top_k": (pb.GenerateRequest(text="hi", sampling=sp(top_k=-3)), "top_k"),
    "min_p above one": (pb.GenerateRequest(text="hi", sampling=sp(min_p=1.5)), "min_p"),
    "logit_bias outside the vocabulary": (
        pb.GenerateRequest(text="hi", sampling=sp(logit_bias={10**9: 1.0})), "logit_bias"),
    "unknown role": (pb.GenerateRequest(messages=chat(("wizard", "hi"))), "role"),
    "no messages": (pb.GenerateRequest(messages=chat()), "messages"),
    "empty user message": (pb.GenerateRequest(messages=chat(("user", ""))), "content"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_invalid_argument(async_service, name):
    request, field = CASES[name]
    with pytest.raises(grpc.RpcError) as err:
        async_service.stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_prompt_longer_than_the_context(async_service):
    info = async_service.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    ids = [100] * (info.max_context_tokens + 5)
    for call in (async_service.stub.Generate, async_service.stub.GenerateStream):
        with pytest.raises(grpc.RpcError) as err:
            list(call(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)), timeout=30)) \
                if call is async_service.stub.GenerateStream else call(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(info.max_context_tokens) in err.value.details()


def test_prompt_plus_max_tokens_beyond_the_context(async_service):
    info = async_service.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    ids = [100] * (info.max_context_tokens - 10)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp(max_tokens=20))
    with pytest.raises(grpc.RpcError) as err:
        async_service.stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in err.value.details()


def test_bad_requests_do_not_disturb_a_running_one(async_service):
    good = pb.GenerateRequest(text="Count from one to twenty:",
                              sampling=sp(max_tokens=40, temperature=0, ignore_eos=True))
    reference = async_service.stub.Generate(good, timeout=120)
    result = {}

    def run_good():
        result["out"] = async_service.stub.Generate(good, timeout=120)

    thread = threading.Thread(target=run_good)
    thread.start()
    for request, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            async_service.stub.Generate(request, timeout=30)
    thread.join()
    assert list(result["out"].token_ids) == list(reference.token_ids)
    assert len(reference.token_ids) == 40
