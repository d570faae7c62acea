"""The gpu_worker's configuration: one frozen dataclass, built once in ``__main__``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tandem import DTYPES, KERNELS
from tandem.slots import SlotShape


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    shm_name: str  # the slot segment created by tokenizer_svc
    link_fd: int  # our end of the doorbell socket
    model: str  # "embedded", "random:<preset>" or a Hugging Face folder
    cache_dir: Path
    slot_shape: SlotShape
    num_slots: int = 2
    device: str = "auto"  # "auto": cuda if present, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    block_size: int = 16
    num_blocks: int | None = None  # None: size the cache from memory
    kv_cache_gib: float | None = None  # cache size; None: 1 GiB on the CPU, else from
    #                                    gpu_memory_utilization on a GPU
    gpu_memory_utilization: float = 0.85
    seed: int = 0  # random-weight presets
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (CUDA only)
    kernels: str = "auto"  # "auto": Triton kernels on CUDA, torch on the CPU; "triton"; "torch"

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, not {self.kernels!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ValueError("block_size and num_blocks must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must lie in (0, 1]")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
