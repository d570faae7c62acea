"""Incremental detokenization and stop strings: turning tokens into safe text deltas."""

from __future__ import annotations

import codecs
import functools
import random
from collections.abc import Callable
from typing import Protocol


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def detokenizer_factory(tokenizer) -> Callable[[], Detokenizer]:
    """Makes each request's detokenizer: a :class:`ByteLevelDetokenizer` where the
    tokenizer's decoding is byte-level BPE's (Llama 3, Qwen2, SmolLM2, GPT-2) and checks out
    against the tokenizer itself, else an :class:`IncrementalDetokenizer`."""
    table = byte_table(tokenizer)
    if table is not None:
        return functools.partial(ByteLevelDetokenizer, table)
    return functools.partial(IncrementalDetokenizer, tokenizer)


class ByteLevelDetokenizer:
    """Byte-level BPE decodes ids by concatenating each token's bytes and reading them as
    UTF-8 (special tokens skipped, each invalid sequence one U+FFFD). So a token's text is a
    table lookup fed to an incremental UTF-8 decoder, which holds back a character split
    across tokens until it is whole: ~0.5 µs a token, where IncrementalDetokenizer calls the
    tokenizer twice (~2 µs; every step, for every request)."""

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.table):
            return ""  # not in the vocabulary: the tokenizer skips it too
        return self._utf8.decode(self.table[token_id])

    def flush(self) -> str:
        """Whatever is still held back (the output has ended)."""
        return self._utf8.decode(b"", final=True)


def byte_table(tokenizer, check_samples: int = 64) -> list[bytes] | None:
    """Each id's bytes as ``tokenizer.decode(..., skip_special_tokens=True)`` concatenates
    them (b"" for special tokens and ids not in the vocabulary), or None where decoding is
    not byte-level BPE's. The table is checked against the tokenizer's own decoding of
    random ids, which are mostly not valid UTF-8 when joined, and of every added token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not _decodes_plainly(type(tokenizer)):
        return None
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    added = backend.get_added_tokens_decoder()
    for token, i in vocab.items():
        if i in added and added[i].special:
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:  # not byte-level text (an added token): the decoder keeps it as is
            table[i] = token.encode()
    decode = _decoder(tokenizer)
    rng = random.Random(0)
    samples = [[rng.randrange(len(table)) for _ in range(rng.randrange(1, 48))]
               for _ in range(check_samples)]
    samples += [[i, rng.randrange(len(table)), i] for i in added]
    for ids in samples:
        if b"".join(table[i] for i in ids).decode("utf-8", "replace") != decode(ids):
            return None
    return table


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands for it
    in the vocabulary (printable Latin-1 as itself, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class IncrementalDetokenizer:
    """Emits the text of each new token as soon as it is settled.

    Decodes a short window of recent tokens rather than the whole output, and
    holds text back while it ends in an incomplete UTF-8 character (U+FFFD), so
    a multi-byte character split across tokens is never emitted broken.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decode = _decoder(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (the output has ended)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def _decoder(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)``.

    For a Transformers fast tokenizer that does not change how it decodes, that is its Rust
    backend's decode alone: called directly, without Transformers' argument handling, which
    takes several times as long as the decoding (twice per token and request, every step)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _decodes_plainly(type(tokenizer)):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True,
                             clean_up_tokenization_spaces=False)


def _decodes_plainly(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (issubclass(cls, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode)


class StopStringMatcher:
    """Finds stop strings in streamed text, even when they span deltas.

    ``feed`` returns the text that is safe to emit: text that cannot be the start
    of a stop string any more. A match ends the output just before the stop string.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if not self.stop:
            return delta
        text = self.held + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = self._partial_match_len(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
