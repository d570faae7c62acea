"""The model's tokenizer and chat template, and the facts about the model that
requests are checked against."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

MAX_CONTEXT_CAP = 8192  # default context when the model allows more (--max-model-len)


class ModelTokenizer:
    def __init__(self, folder: Path, max_model_len: int | None) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self._token_texts: dict[int, str] = {}
        config = json.loads((self.folder / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        model_max = int(config.get("max_position_embeddings") or MAX_CONTEXT_CAP)
        window = config.get("sliding_window")
        if window and (config.get("model_type") == "mistral" or config.get("use_sliding_window")):
            # the model attends to the last `window` tokens only, and Tandem's attention to
            # all of them: the two agree up to the window, so the context stops there
            model_max = min(model_max, int(window))
        self.max_context = max_model_len or min(model_max, MAX_CONTEXT_CAP)
        if self.max_context > model_max:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {model_max}")
        self.eos_token_ids = self._eos_ids(config)

    def _eos_ids(self, config: dict) -> frozenset[int]:
        ids: set[int] = set()
        gen = self.folder / "generation_config.json"
        for source in (json.loads(gen.read_text()) if gen.exists() else {}, config):
            eos = source.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
            if ids:
                break
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def encode_text(self, text: str) -> list[int]:
        # verbose=False: a prompt past the model's length is the caller's to refuse (with
        # INVALID_ARGUMENT), not a warning in the log on every such request
        return list(self.tokenizer(text, verbose=False)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]],
                    continue_final: bool = False) -> list[int]:
        """The conversation through the chat template: with the generation prompt after it,
        or (`continue_final`) with its last, assistant, turn left open to be continued."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=not continue_final,
            continue_final_message=continue_final, tokenize=True)
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(ids))

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (U+FFFD for part of a character): how logprobs
        name it. Cached: logprobs ask for the same few thousand tokens again and again."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text
