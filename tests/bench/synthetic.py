"""Synthetic timelines and results for the bench tests."""

from bench import analysis, report


def synthetic_trace(busy_per_step_us=9.0, step_us=10.0, num_steps=1000):
    """Steps every 10 µs, each with two kernels covering ``busy_per_step_us``."""
    kernels, steps = [], []
    for i in range(num_steps):
        t = 1e6 + i * step_us
        half = busy_per_step_us / 2
        kernels += [[t, t + half], [t + half - 0.5, t + busy_per_step_us]]  # overlapping
        steps.append([t, t + busy_per_step_us])
    return {"device": "cuda:0", "window_us": [1e6, 1e6 + num_steps * step_us],
            "kernels_us": kernels, "steps_us": steps}


def fake_result(meaningful=True, gateway_digest="same", gateway_outputs=((1, 2, 3),)):
    same = analysis.output_blocks([(1, 2, 3)])
    rows = [
        analysis.mode_row("tandem-sync", 10.0, [[(0.0, 1), (1.0, 99)]], {"busy": 0.8},
                          {"busy": 0.75}, [], expected_tokens=100,
                          extra={"outputs_sha256": "same", "output_blocks": same}),
        analysis.mode_row("tandem-async", 8.0, [[(0.0, 1), (0.8, 99)]], {"busy": 0.995},
                          {"busy": None}, [], expected_tokens=100,
                          extra={"outputs_sha256": "same", "output_blocks": same}),
        analysis.mode_row("tandem-gateway", 8.5, [[(0.0, 1), (0.85, 99)]], {"busy": 0.94},
                          {"busy": None}, [], expected_tokens=100,
                          extra={"outputs_sha256": gateway_digest,
                                 "output_blocks": analysis.output_blocks(gateway_outputs)}),
        analysis.skipped_row("hf-async", "skipped", "needs CUDA"),
    ]
    floor = analysis.Floor(15_000_000_000, 3_200_000_000, 3e12, 0.006)
    for row in rows[:3]:
        row["floor_ms"] = 6.0
        row["floor_over_step"] = analysis.ratio(6.0, row["step_ms"])
    return {"device": {"name": "NVIDIA H100", "kind": "cuda", "torch": "2.11"},
            "workload": {"num_requests": 1, "prompt_tokens": 256, "new_tokens": 100},
            "model": {"spec": "random:llama3-8b"}, "meaningful": meaningful,
            "floor": {**floor.__dict__, "avg_context": 768}, "modes": rows,
            "summary": report.summarize(rows)}


