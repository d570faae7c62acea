"""tandem.client against the fake gateway: the requests it sends, what it returns, errors."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tandem.client import Client, Completion, Delta, TandemError, Timing, TokenLogprob
from tandem.v1 import generation_pb2 as pb

INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must lie in (0, 1], got 1.5")


@pytest.fixture
def client(fake):
    with Client(fake.address, timeout=10) as c:
        yield c


def test_generate_sends_text_and_sampling(fake, client):
    out = client.generate("Hello", max_tokens=8, temperature=0, top_p=0.9, top_k=40, seed=7,
                          stop=["\n", "END"], stop_token_ids=[5], ignore_eos=True, logprobs=True,
                          top_logprobs=2, request_id="r-1", priority=-3)
    request = fake.generation.requests[-1]
    assert request.WhichOneof("input") == "text" and request.text == "Hello"
    assert (request.request_id, request.priority) == ("r-1", -3)
    s = request.sampling
    assert s.HasField("temperature") and s.temperature == 0  # greedy, not "unset"
    assert (s.max_tokens, s.top_k, s.seed, s.ignore_eos, s.logprobs, s.top_logprobs) == (
        8, 40, 7, True, True, 2)
    assert s.top_p == pytest.approx(0.9)
    assert list(s.stop) == ["\n", "END"] and list(s.stop_token_ids) == [5]
    assert out == Completion(
        text="Hello world", token_ids=[11, 12, 13, 14], finish_reason="length", prompt_tokens=5,
        completion_tokens=4, logprobs=[TokenLogprob(11, -0.5, [], "Hel")], request_id="r-1",
        timing=Timing(0.25, 0.5, 1.5), cached_prompt_tokens=2)


def test_unset_sampling_stays_unset(fake, client):
    client.generate("Hello", temperature=None, stop="END")
    s = fake.generation.requests[-1].sampling
    assert not s.HasField("temperature") and not s.HasField("seed")
    assert list(s.stop) == ["END"]  # one string, not its characters


def test_messages_and_token_ids(fake, client):
    client.generate(messages=[{"role": "system", "content": "Be brief."}, ("user", "Hi")])
    msgs = fake.generation.requests[-1].messages.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "Be brief."), ("user", "Hi")]
    assert not fake.generation.requests[-1].messages.continue_final_message
    client.generate(token_ids=[1, 2, 3])
    assert list(fake.generation.requests[-1].token_ids.ids) == [1, 2, 3]
    list(client.stream(messages=[("user", "Hi"), ("assistant", "{")],
                       continue_final_message=True))
    assert fake.generation.requests[-1].messages.continue_final_message
    client.tokenize(messages=[("assistant", "{")], continue_final_message=True)
    assert fake.generation.requests[-1].messages.continue_final_message


def test_bad_arguments_never_reach_the_server(fake, client):
    with pytest.raises(TypeError, match="temprature"):
        client.generate("Hello", temprature=0)
    with pytest.raises(ValueError, match="exactly one"):
        client.generate("Hello", token_ids=[1])
    with pytest.raises(ValueError, match="exactly one"):
        client.stream()
    assert fake.generation.requests == []


def test_stream_yields_deltas(fake, client):
    deltas = list(client.stream("Hello", max_tokens=3))
    assert [d.text for d in deltas] == ["Hel", "lo", " world"]
    assert deltas[1] == Delta(text="lo", token_ids=[12, 13], logprobs=[], request_id="fake-1")
    assert deltas[-1].finish_reason == "length"
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens,
            deltas[-1].cached_prompt_tokens) == (5, 4, 2)
    assert deltas[-1].timing == Timing(0.25, 0.5, 1.5)
    assert fake.generation.requests[-1].sampling.max_tokens == 3


def test_leaving_a_stream_early_cancels_it(fake, client):
    fake.generation.chunks = fake.generation.chunks[:1]
    fake.generation.hang = True
    deltas = client.stream("Hello")
    assert next(deltas).text == "Hel"
    deltas.close()
    assert fake.generation.cancelled.wait(10)


def test_api_key_goes_as_bearer_metadata(fake):
    with Client(fake.address, api_key="s3cret") as c:
        c.generate("Hello")
        list(c.stream("Hello"))
        c.model_info()
    assert [m["authorization"] for m in fake.generation.metadata] == ["Bearer s3cret"] * 3
    with Client(fake.address) as c:
        c.generate("Hello")
    assert "authorization" not in fake.generation.metadata[-1]


def test_errors_become_tandem_errors(fake, client):
    fake.generation.error = INVALID
    with pytest.raises(TandemError) as info:
        client.generate("Hello", top_p=1.5)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == INVALID[1]
    assert str(info.value) == f"INVALID_ARGUMENT: {INVALID[1]}"
    with pytest.raises(TandemError, match="INVALID_ARGUMENT"):
        list(client.stream("Hello"))


def test_error_mid_stream_after_deltas(fake, client):
    fake.generation.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (1024)")
    fake.generation.error_after = 1
    got = []
    with pytest.raises(TandemError) as info:
        for delta in client.stream("Hello"):
            got.append(delta.text)
    assert got == ["Hel"] and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=5) as c, pytest.raises(TandemError) as info:
        c.health()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_tokenize_model_info_health(fake, client):
    tokens = client.tokenize("Hello world")
    assert tokens.token_ids == [1, 9906, 1917] and tokens.tokens == ["<s>", "Hello", "Ġworld"]
    assert fake.generation.requests[-1] == pb.TokenizeRequest(text="Hello world")
    client.tokenize(messages=[("user", "Hi")])
    assert fake.generation.requests[-1].messages.messages[0].content == "Hi"
    info = client.model_info()
    assert (info.model, info.vocab_size, info.eos_token_ids) == ("fake-model", 1000, [2])
    assert client.health() == "SERVING"
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client.health() == "NOT_SERVING"
    with pytest.raises(TandemError) as info:
        client.health("no.such.Service")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
