"""bench.host: the engine loop against an instant worker, on a real tokenizer."""

from bench import host
from tandem import models
from tokenizer_svc.tokenization import ModelTokenizer


def test_engine_cpu_per_step_is_measured_over_decode_steps():
    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    ms = host.step_ms(ModelTokenizer(source.folder, None), rows=4, steps=6)
    assert 0 < ms < 1000
