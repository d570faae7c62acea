"""The Transformers baseline's model builder, and the bench's JSON/PNG on the CPU."""

import json

import pytest

from bench import analysis, hf_baseline, report
from bench.workload import ModelInfo
from tandem import models
from tests.bench.synthetic import fake_result, synthetic_trace


def test_random_weights_land_on_the_model_with_working_buffers():
    """The fast path (no init, assign) gives what a plain build plus load_state_dict gives."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
    info = ModelInfo.load(source.name, source.folder, source.random_weights)
    fast = hf_baseline.build_model(info, torch.float32, "cpu", "sdpa")
    assert fast.config._attn_implementation == "paged|sdpa"
    config = AutoConfig.from_pretrained(source.folder)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(models.random_state_dict(config, torch.float32, "cpu"), strict=False)
    plain.tie_weights()
    fast_state, plain_state = fast.state_dict(), plain.state_dict()
    assert fast_state.keys() == plain_state.keys()
    for name, tensor in plain_state.items():
        assert torch.equal(fast_state[name], tensor), name
    for (name, buf), (_, ref) in zip(fast.named_buffers(), plain.named_buffers(), strict=False):
        assert torch.equal(buf, ref), name  # rotary inv_freq computed, not left empty
    assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()


def test_png_and_json_from_a_synthetic_result(tmp_path):
    pytest.importorskip("matplotlib")
    result = fake_result()
    for row, busy in zip(result["modes"][:2], (9.0, 9.95), strict=False):
        row["timeline"] = analysis.analyse_timeline(synthetic_trace(busy), slice_us=200.0)
    report.write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["modes"][0]["mode"] == "tandem-sync"
    assert report.draw_png(result, tmp_path / "bench.png") is None
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


class FakeEvent:
    def __init__(self, name, start_us, end_us, on_gpu=True):
        from torch.autograd import DeviceType

        self._name, self._start, self._end = name, start_us, end_us
        self._type = DeviceType.CUDA if on_gpu else DeviceType.CPU

    def name(self):
        return self._name

    def device_type(self):
        return self._type

    def start_ns(self):
        return int(self._start * 1000)

    def end_ns(self):
        return int(self._end * 1000)


class FakeProfile:
    def __init__(self, events):
        results = type("Results", (), {"events": lambda self: events})()
        self.profiler = type("Profiler", (), {"kineto_results": results})()


def test_profiled_kernels_leave_out_copies_cpu_ops_and_find_the_markers():
    events = [
        FakeEvent("void at::cuda::(anonymous namespace)::spin_kernel(long)", 0, 10),
        FakeEvent("aten::mm", 12, 30, on_gpu=False),
        FakeEvent("Memcpy HtoD (Pinned -> Device)", 10, 20),
        FakeEvent("sm90_xmma_gemm_bf16", 20, 60),
        FakeEvent("Memset (Device)", 60, 61),
        FakeEvent("triton_red_fused_rms_norm", 70, 90),
        FakeEvent("void at::cuda::(anonymous namespace)::spin_kernel(long)", 110, 120),
    ]
    kernels, marks = hf_baseline._kernels(FakeProfile(events))
    assert kernels == [(20.0, 60.0), (70.0, 90.0)]
    assert marks == [(0.0, 10.0), (110.0, 120.0)]
    box = {"kernels_us": kernels, "marks_us": marks}
    cfg = hf_baseline.parse_args(["--mode", "sync", "--out", "x.json", "--timeline-ms", "0.05"])
    notes = []
    timeline = hf_baseline._timeline(box, wall_s=100e-6, cfg=cfg, notes=notes)
    assert timeline["window_s"] == pytest.approx(100e-6)  # from the first marker's end
    assert timeline["busy"] == pytest.approx(0.6)  # (40 + 20) of 100 µs
    assert notes == []


def test_tuned_continuous_batching_config_is_sized_for_the_workload():
    """The cache holds the requests (not ~90% of the GPU), so the sdpa mask stays small."""
    pytest.importorskip("transformers")
    argv = ["--mode", "async", "--out", "x.json", "--device", "cuda", "--num-requests", "32",
            "--prompt-tokens", "256", "--new-tokens", "1024"]
    cfg = hf_baseline.parse_args(argv)
    cb = hf_baseline.cb_config(cfg)
    assert (cb.num_blocks, cb.block_size, cb.max_batch_tokens) == (32 * 6, 256, 2048)
    assert cb.use_async_batching and cb.use_cuda_graph and cfg.full_warmup
    plain = hf_baseline.cb_config(hf_baseline.parse_args(argv + ["--cb", "defaults"]))
    assert plain.num_blocks is None and plain.use_cuda_graph is None
