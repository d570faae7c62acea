"""tokenizer_svc's configuration: frozen dataclasses built once in ``__main__``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tandem import DTYPES, KERNELS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    spec: str = "embedded"  # "embedded", "random:<preset>" or a Hugging Face folder
    cache_dir: Path = Path("~/.cache/tandem").expanduser()
    device: str = "auto"  # the worker's device: "auto", "cpu", "cuda", "cuda:1"
    dtype: str = "auto"
    seed: int = 0  # weights of random presets
    kernels: str = "auto"  # the worker's kernels: "auto" (Triton on CUDA), "triton", "torch"

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"--kernels must be one of {', '.join(KERNELS)}, "
                             f"not {self.kernels!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: the worker sizes the cache from memory
    kv_cache_gib: float | None = None  # None: 1 GiB on the CPU, from the GPU's free memory
    gpu_memory_utilization: float = 0.85
    prefix_caching: bool = True  # reuse cached blocks of identical prompt prefixes

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ValueError("--block-size and --num-kv-blocks must be positive")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must lie in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's, capped at 8192
    default_max_tokens: int = 256
    max_top_logprobs: int = 20
    overlap: bool = True  # False: --sync, wait for batch N before preparing N+1
    batch_wait_ms: float = 0.0  # when idle, wait this long for more requests to arrive
    max_waiting_requests: int = 1024  # admitted but not yet scheduled; beyond: RESOURCE_EXHAUSTED
    max_waiting_tokens: int = 1 << 20  # their prompt tokens

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need --max-num-seqs >= 1 and --max-num-batched-tokens >= it")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2")
        if self.default_max_tokens < 1:
            raise ValueError("--default-max-tokens must be positive")
        if self.max_waiting_requests < 1 or self.max_waiting_tokens < 1:
            raise ValueError("--max-waiting-requests and --max-waiting-tokens must be positive")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"--batch-wait-ms must not be negative, got {self.batch_wait_ms}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    listen: str  # e.g. "unix:///tmp/tandem/engine.sock" or "127.0.0.1:6000"
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_slots: int = 2
    worker_start_timeout: float = 900.0  # seconds for the worker to load and warm up
    grace_period: float = 30.0  # on SIGTERM, seconds in-flight requests get to finish
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP on this port
    metrics_host: str = "127.0.0.1"  # internal endpoints stay on loopback unless asked
    stall_timeout: float = 120.0  # a batch in flight this long: health NOT_SERVING

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("--listen is required")
        if self.num_slots < 2:
            raise ValueError("num_slots must be at least 2 (one filling, one in flight)")
        if not self.grace_period >= 0:
            raise ValueError(f"--grace-period must not be negative, got {self.grace_period}")
        if not self.stall_timeout > 0:
            raise ValueError(f"--stall-timeout must be positive, got {self.stall_timeout}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must lie in [0, 65535], got {self.metrics_port}")
