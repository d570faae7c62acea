"""The benchmark workload and the model it runs on, as plain data."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.analysis import ModelShape, average_context

MODES = ("tandem-sync", "tandem-async", "tandem-gateway", "tandem-http", "hf-sync", "hf-async")
GATEWAY_MODE = "tandem-gateway"  # tandem-async's engine, measured through a gateway
HTTP_MODE = "tandem-http"  # the same, through the gateway's OpenAI-compatible HTTP API


@dataclass(frozen=True)
class Workload:
    """``num_requests`` prompts of ``prompt_tokens`` random ids, each generating exactly
    ``new_tokens`` (EOS ignored), all sent at once."""

    num_requests: int
    prompt_tokens: int
    new_tokens: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_requests", "prompt_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be at least 2 (one prefill, one decode step)")

    @property
    def avg_context(self) -> float:
        return average_context(self.prompt_tokens, self.new_tokens)

    @property
    def total_new_tokens(self) -> int:
        return self.num_requests * self.new_tokens

    def batch_tokens(self, cap: int) -> int:
        """A token budget per step for this workload: all prompts at once, at most ``cap``,
        but never less than one whole prompt or one token per request."""
        return max(self.prompt_tokens, self.num_requests,
                   min(cap, self.num_requests * self.prompt_tokens))


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model folder: its spec, shape and the token ids a prompt may use."""

    spec: str
    folder: Path
    random_weights: bool
    shape: ModelShape
    tie_word_embeddings: bool
    special_ids: frozenset[int]

    @classmethod
    def load(cls, spec: str, folder: Path, random_weights: bool) -> ModelInfo:
        config = json.loads((folder / "config.json").read_text())
        return cls(spec, folder, random_weights, ModelShape.from_hf_config(config),
                   bool(config.get("tie_word_embeddings", False)), _special_ids(folder))


def _special_ids(folder: Path) -> frozenset[int]:
    """Ids of the tokenizer's added (special) tokens, from tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return frozenset()
    added = json.loads(path.read_text()).get("added_tokens", [])
    return frozenset(int(token["id"]) for token in added)


def make_prompts(workload: Workload, model: ModelInfo, seed: int | None = None,
                 num_requests: int | None = None) -> list[list[int]]:
    """Seeded random prompts of exactly ``prompt_tokens`` ordinary (non-special) ids."""
    rng = random.Random(workload.seed if seed is None else seed)
    count = workload.num_requests if num_requests is None else num_requests
    return [[_ordinary_id(rng, model) for _ in range(workload.prompt_tokens)]
            for _ in range(count)]


def _ordinary_id(rng: random.Random, model: ModelInfo) -> int:
    while True:
        token_id = rng.randrange(model.shape.vocab_size)
        if token_id not in model.special_ids:
            return token_id


def warmup_prompts(workload: Workload, model: ModelInfo, num_requests: int) -> list[list[int]]:
    """Prompts for the warm-up: another seed, so no prefix cache can serve the real ones."""
    return make_prompts(workload, model, seed=workload.seed + 1_000_003,
                        num_requests=num_requests)
