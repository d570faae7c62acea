"""The benchmark's arithmetic on synthetic timelines, and its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import analysis, report
from bench.analysis import ModelShape
from bench.workload import GATEWAY_MODE, MODES, ModelInfo, Workload, make_prompts, warmup_prompts
from tests.bench.synthetic import fake_result, synthetic_trace

LLAMA3_8B = {
    "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
}  # fmt: skip


def test_analysis_report_and_workload_import_no_torch():
    code = ("import sys, bench.analysis, bench.report, bench.workload; "
            "sys.exit('torch' in sys.modules)")
    repo = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, check=False).returncode == 0


def test_union_merges_overlapping_touching_and_unsorted():
    merged = analysis.union_intervals([[10, 20], [0, 5], [15, 30], [30, 31], [40, 41], [3, 4]])
    assert merged.tolist() == [[0, 5], [10, 31], [40, 41]]


def test_union_of_nothing_and_of_empty_intervals():
    assert analysis.union_intervals([]).shape == (0, 2)
    assert analysis.union_intervals([[5, 5], [7, 6]]).shape == (0, 2)


def test_union_of_nested_intervals():
    assert analysis.union_intervals([[0, 100], [10, 20], [30, 40]]).tolist() == [[0, 100]]


def test_clip_to_window_drops_outside_and_trims_edges():
    clipped = analysis.clip_intervals([[-10, 5], [20, 30], [95, 120], [200, 300]], (0, 100))
    assert clipped.tolist() == [[0, 5], [20, 30], [95, 100]]


def test_busy_fraction_counts_overlaps_once_and_only_inside_the_window():
    kernels = [[-50, 10], [5, 20], [30, 40], [35, 45], [90, 150]]
    # inside [0, 100]: [0, 20] + [30, 45] + [90, 100] = 45
    assert analysis.busy_fraction(kernels, (0, 100)) == pytest.approx(0.45)
    assert analysis.busy_fraction([], (0, 100)) == 0.0
    assert analysis.busy_fraction([[0, 10]], (5, 5)) == 0.0


def test_idle_gaps_include_leading_and_trailing_idle():
    merged = analysis.busy_union([[10, 20], [30, 40], [40, 90]], (0, 100))
    gaps = analysis.idle_gaps(merged, (0, 100))
    assert gaps.num_gaps == 3  # [0,10], [20,30], [90,100]
    assert gaps.total_us == 30 and gaps.max_us == 10 and gaps.mean_us == 10


def test_idle_gaps_of_a_fully_busy_and_of_an_idle_window():
    assert analysis.idle_gaps(analysis.busy_union([[0, 100]], (0, 100)), (0, 100)).num_gaps == 0
    idle = analysis.idle_gaps(np.zeros((0, 2)), (0, 100))
    assert idle.num_gaps == 1 and idle.total_us == 100


def test_idle_by_gap_size_sorts_gaps_into_classes_and_names_the_longest():
    # gaps: 1 (lead), 1, 10 (hand-off), 100 (stall), 2000 (trailing)
    kernels = [[1, 5], [6, 20], [30, 40], [140, 1000]]
    by_size = analysis.idle_by_gap_size(analysis.busy_union(kernels, (0, 3000)), (0, 3000),
                                        top=2)
    counts = [(c["num_gaps"], c["total_us"]) for c in by_size["classes"]]
    assert counts == [(2, 2.0), (1, 10.0), (1, 100.0), (1, 2000.0)]
    assert by_size["classes"][-1]["below_us"] is None
    assert by_size["longest"] == [{"offset_us": 1000.0, "length_us": 2000.0},
                                  {"offset_us": 40.0, "length_us": 100.0}]


def test_idle_by_neighbours_names_the_kernels_around_each_gap():
    # b and c overlap (two streams); gaps: 1 (a→b), 10 (c→a), 1 (a→c), 100 (c→d)
    kernels = [[0, 5], [6, 15], [10, 20], [30, 40], [41, 60], [160, 170]]
    names = ["a", "b", "c", "a", "c", "d"]
    by = analysis.idle_by_neighbours(analysis.busy_union(kernels, (0, 170)), kernels, names)
    assert by["0-2us"] == [{"before": "a", "after": "b", "num_gaps": 1, "total_us": 1.0},
                           {"before": "a", "after": "c", "num_gaps": 1, "total_us": 1.0}]
    assert by["2-50us"] == [{"before": "c", "after": "a", "num_gaps": 1, "total_us": 10.0}]
    assert by["50-1000us"] == [{"before": "c", "after": "d", "num_gaps": 1, "total_us": 100.0}]
    assert by["1000-infus"] == []
    assert analysis.idle_by_neighbours(np.zeros((0, 2)), [], []) == {}


def test_step_stats_leave_prefill_batches_out():
    steps = [[0, 500]] + [[500 + 10 * i, 510 + 10 * i] for i in range(20)]
    stats = analysis.step_stats(steps)
    assert stats.num_steps == 21 and stats.num_decode_steps == 20
    assert stats.mean_decode_us == pytest.approx(10)
    assert analysis.step_stats([]) is None


def test_analyse_timeline_on_a_synthetic_trace():
    timeline = analysis.analyse_timeline(synthetic_trace(), slice_us=100.0)
    assert timeline["busy"] == pytest.approx(0.9)
    assert timeline["num_kernels"] == 2000
    assert timeline["idle_gaps"]["num_gaps"] == 1000
    assert timeline["idle_gaps"]["p50_us"] == pytest.approx(1.0)
    assert [c["num_gaps"] for c in timeline["idle_by_gap_size"]["classes"]] == [1000, 0, 0, 0]
    assert timeline["steps"]["mean_decode_us"] == pytest.approx(9.0)
    part = timeline["slice"]
    assert part["width_us"] == 100.0 and part["start_us"] == pytest.approx(4950.0)
    assert all(0 <= s < e <= 100 for s, e in part["kernels_us"])
    assert json.loads(json.dumps(timeline)) == timeline  # plain JSON


def test_analyse_timeline_without_kernels_says_nothing_about_busy():
    trace = {"device": "cpu", "window_us": [0, 1000], "kernels_us": [], "steps_us": [[0, 10]]}
    timeline = analysis.analyse_timeline(trace, slice_us=100.0)
    assert timeline["busy"] is None and timeline["slice"] is None
    assert timeline["steps"]["num_steps"] == 1


def test_decode_step_seconds_from_streamed_chunks():
    arrivals = [
        [(0.0, 1), (1.0, 1), (2.0, 1)],  # prefill then 2 steps of 1 s
        [(0.5, 1), (2.5, 2)],  # one chunk of 2 tokens: 2 steps in 2 s
        [(3.0, 1)],  # no decode step: left out
    ]
    assert analysis.decode_step_seconds(arrivals) == pytest.approx(1.0)
    assert analysis.decode_step_seconds([[(0.0, 1)]]) is None


def test_llama3_8b_floor_at_batch_32_and_context_768():
    shape = ModelShape.from_hf_config(LLAMA3_8B)
    assert shape.head_dim == 128
    avg = analysis.average_context(256, 1024)
    assert avg == 768
    floor = analysis.decode_floor(shape, dtype_bytes=2, batch=32, avg_context=avg,
                                  bandwidth_bytes_per_s=3.0e12)
    # 8.03 B parameters less the 0.53 B embedding table (gathered, not read); lm_head read
    assert floor.weights_bytes == pytest.approx(15.01e9, rel=1e-3)
    assert floor.kv_bytes == 32 * 2 * 8 * 128 * 2 * 32 * 768  # 3.22 GB
    assert floor.kv_bytes == pytest.approx(3.22e9, rel=1e-3)
    assert floor.seconds == pytest.approx((floor.weights_bytes + floor.kv_bytes) / 3.0e12)


def test_tied_embeddings_still_read_the_lm_head_once():
    untied = ModelShape.from_hf_config(LLAMA3_8B).decode_weight_params()
    tied = ModelShape.from_hf_config(LLAMA3_8B | {"tie_word_embeddings": True})
    assert tied.decode_weight_params() == untied


def test_workload_prompts_are_seeded_exact_and_avoid_special_ids(tmp_path):
    shape = ModelShape.from_hf_config(LLAMA3_8B)
    specials = frozenset(range(128000, 128256))
    model = ModelInfo("random:llama3-8b", tmp_path, True, shape, False, specials)
    wl = Workload(num_requests=32, prompt_tokens=256, new_tokens=1024)
    prompts = make_prompts(wl, model)
    assert len(prompts) == 32 and all(len(p) == 256 for p in prompts)
    assert max(max(p) for p in prompts) < 128000
    assert make_prompts(wl, model) == prompts
    assert warmup_prompts(wl, model, 2)[0] != prompts[0]
    with pytest.raises(ValueError):
        Workload(num_requests=0, prompt_tokens=1, new_tokens=2)


def test_summary_speedup_and_sync_ceiling():
    summary = fake_result()["summary"]
    assert summary["tandem_async_speedup"] == pytest.approx(1.25)
    assert summary["sync_busy_ceiling"] == pytest.approx(1.25)
    assert summary["sync_busy_source"] == "kernels"
    assert summary["hf_async_speedup"] is None


def test_summary_gateway_over_engine_and_its_outputs():
    summary = fake_result()["summary"]
    assert summary["gateway_over_engine"] == pytest.approx(8.0 / 8.5)  # same tokens, 8.5 s
    assert summary["tandem_async_outputs_equal_sync"] is True
    assert summary["tandem_gateway_outputs_equal_async"] is True
    assert fake_result(gateway_digest="other")["summary"][
        "tandem_gateway_outputs_equal_async"] is False


def test_output_blocks_say_which_requests_differ_and_from_where():
    n = analysis.OUTPUT_BLOCK
    base = [list(range(3 * n)), list(range(10)), [7] * n]
    blocks = analysis.output_blocks(base)
    assert [len(b) for b in blocks] == [3, 1, 1]
    assert analysis.compare_outputs(blocks, analysis.output_blocks(base)) == {
        "requests": 3, "equal": 3, "first_difference": None}
    late = [base[0][:2 * n + 5] + [0] * (n - 5), base[1], base[2]]
    early = [base[0], base[1][:4] + [99] * 6, base[2]]
    assert analysis.compare_outputs(blocks, analysis.output_blocks(late)) == {
        "requests": 3, "equal": 2, "first_difference": 2 * n}
    both = analysis.compare_outputs(analysis.output_blocks(late), analysis.output_blocks(early))
    assert both == {"requests": 3, "equal": 1, "first_difference": 0}
    shorter = [base[0][:n], base[1], base[2]]  # stopped early: differs where it stopped
    assert analysis.compare_outputs(blocks, analysis.output_blocks(shorter))[
        "first_difference"] == n
    assert analysis.compare_outputs(blocks, None) is None
    assert analysis.compare_outputs(blocks, blocks[:2])["equal"] is None


def test_table_says_how_many_requests_differ():
    result = fake_result(gateway_digest="other", gateway_outputs=((1, 2, 4),))
    summary = result["summary"]
    assert summary["tandem_gateway_vs_async_outputs"] == {
        "requests": 1, "equal": 0, "first_difference": 0}
    assert summary["tandem_async_vs_sync_outputs"]["equal"] == 1
    text = report.format_table(result)
    assert (f"gateway outputs equal async: NO (1 of 1 requests differ, the first from "
            f"tokens 0-{analysis.OUTPUT_BLOCK - 1})") in text
    assert "async outputs equal sync: yes;" in report.format_table(fake_result())


def test_summary_without_a_gateway_or_an_engine_row():
    rows = fake_result()["modes"]
    no_gateway = report.summarize([r for r in rows if r["mode"] != "tandem-gateway"])
    assert no_gateway["gateway_over_engine"] is None
    assert no_gateway["tandem_gateway_outputs_equal_async"] is None
    no_engine = report.summarize([r for r in rows if r["mode"] != "tandem-async"])
    assert no_engine["gateway_over_engine"] is None
    failed = [analysis.skipped_row("tandem-gateway", "failed", "boom") if
              r["mode"] == "tandem-gateway" else r for r in rows]
    assert report.summarize(failed)["gateway_over_engine"] is None


def test_table_says_where_an_async_mode_was_idle():
    result = fake_result()
    timeline = analysis.analyse_timeline(synthetic_trace(), slice_us=100.0)
    for row in result["modes"][:2]:
        row["timeline"] = timeline
    text = report.format_table(result)
    assert "idle [tandem-async]: 1.0 ms in 1000 gaps of 0-2 us" in text
    assert "idle [tandem-sync]" not in text  # the sync run's idle is the point of it


def test_gateway_mode_runs_right_after_the_async_engine_by_default():
    assert MODES.index(GATEWAY_MODE) == MODES.index("tandem-async") + 1


def test_table_has_the_columns_the_card_and_the_notes():
    text = report.format_table(fake_result())
    assert "NVIDIA H100" in text
    for header in ("tok/s", "wall s", "busy% (kernels)", "busy% (NVML)", "step ms",
                   "floor ms", "floor/step"):
        assert header in text
    assert "99.5%" in text and "skipped" in text and "needs CUDA" in text
    assert "1.250x" in text
    assert "tandem-gateway" in text and "94.0%" in text
    assert "gateway vs the engine's own (async): 0.941x" in text
    assert "gateway outputs equal async: yes" in text
    assert "idle [" not in text  # no timeline, no breakdown
    assert report.NOT_MEANINGFUL not in text
    assert report.NOT_MEANINGFUL in report.format_table(fake_result(meaningful=False))
