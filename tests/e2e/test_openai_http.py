"""The OpenAI-compatible HTTP API of a live gateway, through OpenAI's own Python library: the
same tokens as the gRPC API, streamed or not, and its errors."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tandem.v1 import generation_pb2 as pb

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(async_service):
    if async_service.http_url is None:
        pytest.skip("aiohttp is not installed: the service runs without its HTTP API")
    with openai.OpenAI(base_url=async_service.http_url, api_key="none", timeout=120,
                       max_retries=0) as c:
        yield c


def grpc_chat(service, max_tokens):
    return service.stub.Generate(pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT]),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)),
        timeout=120)


def test_a_chat_completion_has_the_tokens_of_the_grpc_api(client, async_service):
    (model,) = [m.id for m in client.models.list()]
    expected = grpc_chat(async_service, 12)
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        expected.usage.prompt_tokens, 12)


def test_a_streamed_chat_completion_concatenates_to_the_same_text(client, async_service):
    expected = grpc_chat(async_service, 12)
    stream = client.chat.completions.create(
        model="", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        expected.text
    assert chunks[-1].usage.completion_tokens == 12


def test_a_completion_with_logprobs(client, async_service):
    expected = async_service.stub.Generate(pb.GenerateRequest(
        text="Once upon a time", sampling=pb.SamplingParams(
            max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)), timeout=120)
    out = client.completions.create(model="", prompt="Once upon a time", max_tokens=6,
                                    temperature=0, logprobs=2)
    assert out.choices[0].text == expected.text
    assert out.choices[0].logprobs.tokens == [lp.token for lp in expected.logprobs]
    assert all(lp.token for lp in expected.logprobs)  # named by their text
    assert [list(top) for top in out.choices[0].logprobs.top_logprobs] == [
        [t.token for t in lp.top] for lp in expected.logprobs]


def test_tokenize_and_the_model_card(client, async_service):
    (model,) = [m.id for m in client.models.list()]
    assert client.models.retrieve(model).id == model
    request = urllib.request.Request(
        async_service.http_url.removesuffix("/v1") + "/tokenize", method="POST",
        data=json.dumps({"messages": CHAT}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        out = json.loads(reply.read())
    expected = async_service.stub.Tokenize(pb.TokenizeRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])), timeout=60)
    assert out["tokens"] == list(expected.token_ids) and out["count"] == len(out["tokens"])


def test_bad_input_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="", prompt="Hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-4", prompt="Hi")


def test_n_seeded_choices_are_each_what_a_request_with_its_seed_gives(client):
    sampled = {"model": "", "prompt": "Once upon a time", "max_tokens": 8,
               "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(n=3, seed=11, **sampled)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [client.completions.create(seed=11 + i, **sampled).choices[0].text
             for i in range(3)]
    assert [c.text for c in out.choices] == alone
    assert out.usage.completion_tokens == 24
    stream = client.completions.create(n=3, seed=11, stream=True, **sampled)
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == alone
