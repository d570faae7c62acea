"""bench.host: the engine loop against an instant worker, on a real tokenizer."""

from bench import host
from tandem import models
from tokenizer_svc.tokenization import ModelTokenizer


def test_engine_cpu_per_step_is_measured_over_decode_steps():
    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    ms = host.step_ms(ModelTokenizer(source.folder, None), rows=4, steps=6)
    assert 0 < ms < 1000


def test_served_engine_streams_every_token_over_grpc():
    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    for multiplexed in (False, True):
        # 100 steps: /proc counts CPU time in 10 ms ticks, and 12 steps could read as none
        got, cpu_ms = host.served(str(source.folder), rows=4, step_ms=1.0, new_tokens=100,
                                  multiplexed=multiplexed)
        assert 0 < got <= 4 / 1e-3 * 1.05  # at most what 1 ms batches of 4 rows allow
        assert 0 < cpu_ms < 1000  # the serving process used some CPU: read from /proc
