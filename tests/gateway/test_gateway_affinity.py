"""Prefix-aware routing's bookkeeping: input keys and the key -> engine memory."""

from __future__ import annotations

import pytest

from gateway.__main__ import config_from_args
from gateway.affinity import PrefixAffinity, input_bytes, prefix_keys
from gateway.config import GatewayConfig
from tandem.v1 import generation_pb2 as pb


def test_keys_cover_whole_chunks_and_chain_over_the_prefix():
    data = bytes(range(256)) * 5  # 1280 bytes: two whole 512-byte chunks
    keys = prefix_keys(data)
    assert len(keys) == 2 and keys == prefix_keys(data[:1100])  # the tail changes nothing
    assert prefix_keys(data[:511]) == []
    changed = b"x" + data[1:]
    assert prefix_keys(changed)[1] != keys[1]  # the second key depends on the first chunk
    assert len(prefix_keys(b"a" * 10_000, limit=4)) == 4


def test_input_kinds_never_share_keys():
    text = pb.GenerateRequest(text="hello")
    chat = pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="hello")]))
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))
    kinds = {input_bytes(r)[:1] for r in (text, chat, ids)}
    assert kinds == {b"t", b"m", b"i"}
    other_role = pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="system", content="hello")]))
    assert input_bytes(other_role) != input_bytes(chat)


def test_affinity_remembers_the_last_engine_of_each_key_and_forgets_the_oldest():
    affinity = PrefixAffinity(capacity=3)
    a, b = prefix_keys(b"a" * 2048), prefix_keys(b"b" * 1024)
    affinity.record("e1", a[:2])
    assert affinity.depth("e1", a) == 2 and affinity.depth("e2", a) == 0
    affinity.record("e2", a[1:2])  # a later request's prefix went elsewhere
    assert affinity.depth("e1", a) == 1 and affinity.depth("e2", a) == 2
    affinity.record("e2", b)  # 4 keys > capacity 3: a[0], the oldest, goes
    assert len(affinity) == 3 and affinity.depth("e1", a) == 0
    assert affinity.depth("e2", b) == 2


def test_routing_flag():
    assert config_from_args(["--engine", "x:1"])[0].routing == "prefix"
    assert config_from_args(["--engine", "x:1", "--routing", "least-loaded"])[0].routing == \
        "least-loaded"
    with pytest.raises(ValueError, match="routing"):
        GatewayConfig(engine_addresses=("x:1",), routing="random")


def test_a_conversation_keeps_its_engine_when_its_system_prompt_goes_elsewhere():
    system = b"s" * 512
    turn1 = prefix_keys(system + b"u" * 3000)  # 6 keys
    turn2 = prefix_keys(system + b"u" * 3000 + b"v" * 1024)
    affinity = PrefixAffinity()
    affinity.record("e1", turn1)
    affinity.record("e2", prefix_keys(system + b"w" * 600))  # another user, another engine
    assert affinity.depth("e1", turn2) == 6 and affinity.depth("e2", turn2) == 1
