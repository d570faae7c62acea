"""Incremental detokenization and stop strings, with a byte-level fake tokenizer."""

from tokenizer_svc.detokenizer import IncrementalDetokenizer, StopStringMatcher


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
