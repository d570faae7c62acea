"""The worker: owns the device, the weights and the KV cache; runs batches in order.

Loop: wait for the doorbell → copy slot k's inputs to the device → fill
placeholders from the previous batch's on-device output → run the model →
sample → copy the sampled tokens into slot k's output area → say DONE.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gpu_worker.attention import KVCache, TorchPagedAttention
from gpu_worker.config import WorkerConfig
from gpu_worker.model import LlamaModel, LlamaShape, load_config, load_weights
from gpu_worker.runner import ModelRunner, read_batch, write_outputs
from tandem import models
from tandem import slots as S
from tandem.link import Kind, Link, Message

log = logging.getLogger("gpu_worker")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = self._load_model()
        self.cache = self._allocate_cache()
        attention = TorchPagedAttention(self.cache, scale=self.model.shape.head_dim**-0.5)
        self.runner = ModelRunner(self.model, attention)
        self.segment = S.SlotSegment(S.SlotLayout(cfg.slot_shape, cfg.num_slots), cfg.shm_name)
        self.link = Link.from_fd(cfg.link_fd)

    def _load_model(self) -> LlamaModel:
        source = models.resolve_model(self.cfg.model, self.cfg.cache_dir)
        config = load_config(source.folder)
        if source.random_weights:
            weights = models.random_state_dict(config, self.dtype, self.device, self.cfg.seed)
        else:
            weights = load_weights(source.folder, self.dtype, self.device)
        log.info("loaded %s on %s in %s", source.name, self.device, self.dtype)
        return LlamaModel(config, weights, self.dtype, self.device)

    def _allocate_cache(self) -> KVCache:
        s: LlamaShape = self.model.shape
        per_block = KVCache.bytes_per_block(
            s.num_layers, self.cfg.block_size, s.num_kv_heads, s.head_dim, self.dtype
        )
        num_blocks = self.cfg.num_blocks or self._fit_blocks(per_block)
        log.info("KV cache: %d blocks of %d tokens", num_blocks, self.cfg.block_size)
        return KVCache(s.num_layers, num_blocks, self.cfg.block_size, s.num_kv_heads,
                       s.head_dim, self.dtype, self.device)

    def _fit_blocks(self, per_block: int) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.cfg.gpu_memory_utilization)
            budget = free - reserve - 2 * 1024**3  # room for activations and graphs
        else:
            budget = self.cfg.kv_cache_gib * 1024**3
        return max(int(budget // per_block), 1)

    def warm_up(self) -> None:
        """Run one small batch through the whole path (allocations, kernels)."""
        view = self.segment.slots[0]
        n = min(8, self.cfg.slot_shape.max_num_tokens)
        view.header[:] = 0
        view.header[[S.H_NUM_TOKENS, S.H_NUM_ROWS, S.H_MAX_QUERY_LEN, S.H_MAX_CONTEXT_LEN]] = [
            n, 1, n, n]
        view.input_ids[:n] = np.arange(n)
        view.positions[:n] = np.arange(n)
        view.slot_mapping[:n] = np.arange(n)  # block 0: any later owner rewrites it first
        view.query_start[:2] = [0, n]
        view.context_lens[0] = n
        view.block_tables[0, :] = 0
        view.temperature[0], view.top_p[0], view.top_k[0], view.seed[0] = 1.0, 0.9, 5, 1
        self.runner.run(read_batch(view, self.device))
        self.runner.prev_seq, self.runner.prev_sampled = 0, None

    def serve(self) -> None:
        dtype = str(self.dtype).removeprefix("torch.")
        self.link.send(Message(Kind.READY, arg=self.cache.num_blocks,
                               payload=f"{self.device} {dtype}".encode()))
        while True:
            msg = self.link.recv()
            if msg.kind == Kind.SHUTDOWN:
                return
            if msg.kind != Kind.RUN:
                raise RuntimeError(f"unexpected message {msg.kind!r}")
            self._run(msg.slot, msg.seq)

    def _run(self, slot: int, seq: int) -> None:
        view = self.segment.slots[slot]
        batch = read_batch(view, self.device)
        if batch.seq != seq:
            raise RuntimeError(f"slot {slot} holds batch {batch.seq}, doorbell said {seq}")
        out = self.runner.run(batch)
        write_outputs(view, seq, out)
        self.link.send(Message(Kind.DONE, slot=slot, seq=seq))

    def close(self) -> None:
        self.segment.close()
        self.link.close()
