"""The device under test: a probe (name, memory bandwidth) and an NVML utilization sampler.

``python -m bench.device [--device auto|cpu|cuda]`` prints the probe as JSON. The bench
runs it in a subprocess so that its own process never holds a CUDA context while an
engine owns the GPU. The NVML sampler needs no CUDA context: it uses ``pynvml`` when
installed, else ``libnvidia-ml.so.1`` through ctypes, else reports why it has nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Self


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, nbytes: int, iters: int) -> float:
    """Bytes per second of a large device-to-device copy, read plus write bytes counted."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    dst.copy_(src)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - started)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def pci_bus_id(props) -> str | None:
    """NVML's "domain:bus:device.function" for a torch device, when torch says it."""
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return None


def probe(device: str = "auto") -> dict:
    """Which device the bench will use, its name and its measured memory bandwidth."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"kind": "cuda" if device.startswith("cuda") else "cpu", "torch": torch.__version__}
    if info["kind"] == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory=props.total_memory,
                    pci_bus_id=pci_bus_id(props), cuda=torch.version.cuda)
        bandwidth = measure_bandwidth(device, nbytes=2 << 30, iters=50)
    else:
        info.update(name=_cpu_name(), total_memory=None, pci_bus_id=None, cuda=None)
        bandwidth = measure_bandwidth("cpu", nbytes=256 << 20, iters=4)
    info["bandwidth_bytes_per_s"] = bandwidth
    return info


# --- NVML -----------------------------------------------------------------------------


class NvmlUnavailable(Exception):
    pass


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


@functools.cache  # one NVML init per device: the sweep asks for its state at every point
def _ctypes_device(pci_bus_id: str | None) -> tuple[ctypes.CDLL, ctypes.c_void_p]:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        raise NvmlUnavailable(f"no pynvml and no libnvidia-ml.so.1 ({exc})") from None
    if lib.nvmlInit_v2() != 0:
        raise NvmlUnavailable("nvmlInit failed")
    handle = ctypes.c_void_p()
    found = pci_bus_id is not None and \
        lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle)) == 0
    if not found and lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0:
        raise NvmlUnavailable("NVML found no device")
    return lib, handle


def _ctypes_reader(pci_bus_id: str | None) -> Callable[[], int]:
    lib, handle = _ctypes_device(pci_bus_id)
    util = _Utilization()

    def read() -> int:
        if lib.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(util)) != 0:
            raise NvmlUnavailable("nvmlDeviceGetUtilizationRates failed")
        return int(util.gpu)

    return read


# NVML's clock-event (throttle) reason bits, and the names device_state gives them
CLOCK_REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap",
                 0x8: "hardware slowdown", 0x10: "sync boost", 0x20: "software thermal",
                 0x40: "hardware thermal", 0x80: "power brake", 0x100: "display clocks"}


def clock_reasons(mask: int) -> list[str]:
    """The names of the reasons set in an NVML clock-event mask (unknown bits in hex)."""
    names = [name for bit, name in CLOCK_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_REASONS)
    return names + ([hex(rest)] if rest else [])


def device_state(pci_bus_id: str | None = None) -> dict[str, Any] | None:
    """The GPU's state now, for telling runs on one card apart: SM and memory clocks (MHz),
    temperature (C), power draw (W) and why the clocks are below their maximum. None where
    NVML cannot say (no GPU, no library); a reading NVML refuses is left out."""
    try:
        lib, handle = _ctypes_device(pci_bus_id)
    except NvmlUnavailable:
        return None
    value, wide = ctypes.c_uint(), ctypes.c_ulonglong()
    state: dict[str, Any] = {}
    readings = (("sm_mhz", lib.nvmlDeviceGetClockInfo, (1,), 1),  # NVML_CLOCK_SM
                ("mem_mhz", lib.nvmlDeviceGetClockInfo, (2,), 1),  # NVML_CLOCK_MEM
                ("temp_c", lib.nvmlDeviceGetTemperature, (0,), 1),  # NVML_TEMPERATURE_GPU
                ("power_w", lib.nvmlDeviceGetPowerUsage, (), 1000))  # milliwatts
    for key, call, args, per_unit in readings:
        if call(handle, *args, ctypes.byref(value)) == 0:
            state[key] = value.value / per_unit if per_unit > 1 else value.value
    if lib.nvmlDeviceGetCurrentClocksThrottleReasons(handle, ctypes.byref(wide)) == 0:
        state["clock_reasons"] = clock_reasons(wide.value)
    return state


def _pynvml_reader(pci_bus_id: str | None) -> Callable[[], int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id) if pci_bus_id else None
    except pynvml.NVMLError:
        handle = None
    handle = handle or pynvml.nvmlDeviceGetHandleByIndex(0)
    return lambda: int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def open_nvml(pci_bus_id: str | None) -> Callable[[], int]:
    """A function returning the device's NVML utilization (percent); NvmlUnavailable if none."""
    try:
        return _pynvml_reader(pci_bus_id)
    except ImportError:
        return _ctypes_reader(pci_bus_id)
    except Exception as exc:  # noqa: BLE001 - pynvml's errors: try the library directly
        try:
            return _ctypes_reader(pci_bus_id)
        except NvmlUnavailable:
            raise NvmlUnavailable(f"pynvml failed: {exc}") from None


@dataclass
class NvmlResult:
    busy: float | None  # mean utilization over the samples, 0..1
    num_samples: int
    note: str
    state_at_end: dict[str, Any] | None = None  # device_state() as the window closed


class NvmlSampler:
    """Samples NVML utilization every ``interval_s`` in a thread while the block runs.

    NVML's figure is the share of its own last sample period (1/6 s to 1 s) in which a
    kernel ran, so the mean over a window of many periods is what compares."""

    def __init__(self, enabled: bool, pci_bus_id: str | None, interval_s: float = 0.02):
        self.enabled, self.pci_bus_id, self.interval_s = enabled, pci_bus_id, interval_s
        self.samples: list[int] = []
        self.note = "no GPU" if not enabled else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state_at_end: dict[str, Any] | None = None

    def __enter__(self) -> Self:
        if self.enabled:
            try:
                read = open_nvml(self.pci_bus_id)
            except NvmlUnavailable as exc:
                self.note = str(exc)
                return self
            self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.state_at_end = device_state(self.pci_bus_id)

    def _run(self, read: Callable[[], int]) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(read())
            except Exception as exc:  # noqa: BLE001 - keep the samples, say why it stopped
                self.note = f"sampling stopped: {exc}"
                return

    def result(self) -> NvmlResult:
        if not self.samples:
            return NvmlResult(None, 0, self.note or "no samples", self.state_at_end)
        mean = sum(self.samples) / len(self.samples) / 100
        return NvmlResult(mean, len(self.samples), self.note, self.state_at_end)


def result_dict(sampler: NvmlSampler) -> dict:
    return asdict(sampler.result())


def tool_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """How each ``python -m bench.<tool>`` starts: logging on stderr (stdout carries its
    JSON), and an argument parser whose help is the module's docstring."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
