"""The engine's step histogram exposes what prometheus_client's Histogram exposes for the
same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokenizer_svc.metrics import TOKEN_BUCKETS, StepHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_a_step_of_observations_reads_as_a_histogram_of_them():
    # on a bound, between bounds, below the first, above the last, and a step with none
    steps = [[0.001, 0.0005, 0.0025], [], [0.003, 2.0], [0.1, 0.1000001, 1e-9]]
    ours, reference = CollectorRegistry(), CollectorRegistry()
    step_hist = StepHistogram("t_seconds", "doc", TOKEN_BUCKETS, ours)
    hist = Histogram("t_seconds", "doc", buckets=TOKEN_BUCKETS, registry=reference)
    for step in steps:
        step_hist.observe_many(step)
        for value in step:
            hist.observe(value)
    step_hist.observe(0.05)
    hist.observe(0.05)
    assert exposition(ours) == exposition(reference)
    assert 't_seconds_bucket{le="+Inf"} 9.0' in exposition(ours)
