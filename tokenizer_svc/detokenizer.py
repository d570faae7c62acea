"""Incremental detokenization and stop strings: turning tokens into safe text deltas."""

from __future__ import annotations

import functools
from collections.abc import Callable


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
