"""The NVML sampler and the profiler-event filter, with fakes where a GPU would be."""

import time

import pytest

from bench import device
from bench.device import NvmlSampler


def test_sampler_averages_utilization(monkeypatch):
    readings = iter([50, 100] * 1000)
    monkeypatch.setattr(device, "open_nvml", lambda pci: lambda: next(readings))
    with NvmlSampler(enabled=True, pci_bus_id=None, interval_s=0.001) as sampler:
        time.sleep(0.05)
    result = sampler.result()
    assert result.num_samples >= 2
    assert 0.5 <= result.busy <= 1.0


def test_sampler_without_nvml_says_why(monkeypatch):
    def unavailable(pci):
        raise device.NvmlUnavailable("no libnvidia-ml.so.1")

    monkeypatch.setattr(device, "open_nvml", unavailable)
    with NvmlSampler(enabled=True, pci_bus_id="00000000:19:00.0") as sampler:
        pass
    assert sampler.result().busy is None and "libnvidia-ml" in sampler.result().note
    with NvmlSampler(enabled=False, pci_bus_id=None) as sampler:
        pass
    assert sampler.result().note == "no GPU"


def test_sampler_keeps_samples_when_nvml_breaks(monkeypatch):
    calls = iter([80, 80])

    def read():
        value = next(calls, None)
        if value is None:
            raise RuntimeError("GPU is lost")
        return value

    monkeypatch.setattr(device, "open_nvml", lambda pci: read)
    with NvmlSampler(enabled=True, pci_bus_id=None, interval_s=0.001) as sampler:
        time.sleep(0.05)
    assert sampler.result().busy == pytest.approx(0.8)
    assert "GPU is lost" in sampler.result().note


def test_bandwidth_on_the_cpu_is_positive():
    pytest.importorskip("torch")
    assert device.measure_bandwidth("cpu", nbytes=1 << 20, iters=2) > 0


def test_clock_reasons_are_named_and_unknown_bits_kept():
    assert device.clock_reasons(0) == []
    assert device.clock_reasons(0x4 | 0x40) == ["power cap", "hardware thermal"]
    assert device.clock_reasons(0x1 | 0x1000) == ["idle", "0x1000"]


def test_device_state_is_none_without_nvml(monkeypatch):
    def no_library(*_):
        raise device.NvmlUnavailable("no libnvidia-ml.so.1")

    monkeypatch.setattr(device, "_ctypes_device", no_library)
    assert device.device_state() is None


def test_sweep_describes_the_state_it_has():
    from bench.sweep import describe_state

    assert describe_state(None) == ""
    assert describe_state({"sm_mhz": 1755, "temp_c": 61, "power_w": 612.4,
                           "clock_reasons": ["power cap"]}) == \
        " (SM 1755 MHz, 61 C, 612 W; power cap)"
    assert describe_state({"mem_mhz": 3201, "clock_reasons": []}) == " (memory 3201 MHz)"
