"""Incremental detokenization and stop strings, with a byte-level fake tokenizer."""

import random

import pytest

from tokenizer_svc import detokenizer
from tokenizer_svc.detokenizer import (
    ByteLevelDetokenizer,
    IncrementalDetokenizer,
    StopStringMatcher,
    byte_table,
    detokenizer_factory,
)


class ByteTokenizer:
    """Token i is byte i; 256 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def stream(text_bytes):
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = [detok.add(b) for b in text_bytes]
    return deltas, detok.flush()


def test_multibyte_characters_are_never_split():
    text = "héllo wörld — 你好 🎉"
    deltas, tail = stream(text.encode())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text
    assert "🎉" in deltas  # emitted whole, once all four bytes are in


def test_flush_emits_an_unfinished_character():
    deltas, tail = stream(b"ab" + "é".encode()[:1])
    assert "".join(deltas) == "ab" and tail == "\ufffd"


def test_special_tokens_are_skipped():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add(ord("a")) == "a"
    assert detok.add(256) == ""
    assert detok.add(ord("b")) == "b"


def feed_all(stops, deltas):
    m = StopStringMatcher(tuple(stops))
    out = []
    for d in deltas:
        out.append(m.feed(d))
        if m.stopped:
            break
    return out, m


def test_stop_string_across_deltas_is_cut_and_never_leaks():
    out, m = feed_all(["STOP"], ["Hello S", "TO", "P and more"])
    assert m.stopped and "".join(out) == "Hello "
    assert out[0] == "Hello "  # the "S" was held back


def test_held_text_is_released_when_it_stops_matching():
    out, m = feed_all(["STOP"], ["Hello ST", "ART"])
    assert not m.stopped and "".join(out) + m.flush() == "Hello START"
    assert out == ["Hello ", "START"]


def test_earliest_of_several_stop_strings_wins():
    out, m = feed_all(["world", "lo w"], ["hello world"])
    assert m.stopped and out == ["hel"]


def test_no_stop_strings_passes_through():
    out, m = feed_all([], ["a", "b"])
    assert out == ["a", "b"] and not m.stopped


# --- byte-level BPE: a table lookup per token ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from tandem import models

    folder = models.resolve_model("embedded", models.default_cache_dir()).folder
    return AutoTokenizer.from_pretrained(folder)


def test_byte_level_deltas_add_up_to_the_tokenizers_decode(smollm2):
    table = byte_table(smollm2)
    assert table is not None and len(table) == len(smollm2)
    assert isinstance(detokenizer_factory(smollm2)(), ByteLevelDetokenizer)
    rng = random.Random(3)
    special = sorted(smollm2.all_special_ids)
    texts = ["héllo wörld — 你好 🎉", "a\n\tb  c", "ß" * 7 + "🎉🎉"]
    cases = [smollm2.encode(t) for t in texts]  # valid text, split across tokens
    cases += [[rng.randrange(len(table) + 5) for _ in range(rng.randrange(1, 60))]
              for _ in range(300)]  # random ids: invalid UTF-8, specials, unknown ids
    cases += [[*smollm2.encode("héllo"), special[0], *smollm2.encode(" 你好")]]
    for ids in cases:
        detok = ByteLevelDetokenizer(table)
        deltas = [detok.add(i) for i in ids]
        assert "".join(deltas) + detok.flush() == smollm2.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for text, ids in zip(texts, cases, strict=False):
        detok = ByteLevelDetokenizer(table)
        deltas = [detok.add(i) for i in ids]
        assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text
    detok = ByteLevelDetokenizer(table)  # a token of a space and half a character:
    assert [detok.add(i) for i in smollm2.encode(" 🎉")] == [" ", "", "🎉"]  # the space now


def test_the_table_is_checked_against_the_tokenizer(smollm2, monkeypatch):
    assert isinstance(detokenizer_factory(ByteTokenizer())(), IncrementalDetokenizer)
    monkeypatch.setattr(detokenizer, "_decoder", lambda tok: lambda ids: "x")
    assert byte_table(smollm2) is None  # a decoding the table does not reproduce
    assert isinstance(detokenizer_factory(smollm2)(), IncrementalDetokenizer)
