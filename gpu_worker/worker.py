"""The worker: owns the device, the weights and the KV cache; runs batches in order.

Loop: wait for the doorbell → enqueue batch N (see :mod:`gpu_worker.pipeline`)
→ say ENQUEUED (CUDA: tokenizer_svc waits on the batch's IPC event itself) or
DONE (CPU: the batch ran synchronously) → wait for the next doorbell.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from gpu_worker.attention import KVCache, make_attention
from gpu_worker.config import WorkerConfig
from gpu_worker.device_slots import DeviceSlots
from gpu_worker.model import LlamaModel, LlamaShape, load_config, load_weights
from gpu_worker.ops import make_ops
from gpu_worker.pipeline import Pipeline
from gpu_worker.runner import BatchInfo, ModelRunner
from gpu_worker.trace import Tracer
from tandem import models
from tandem import slots as S
from tandem.link import Kind, Link, Message, ReadyInfo, StepTiming

log = logging.getLogger("gpu_worker")


def resolve_device(name: str) -> torch.device:
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = self._load_model()
        self.cache = self._allocate_cache()  # the last block is the scratch block
        self.num_blocks = self.cache.num_blocks - 1
        attention = make_attention(self.cache, self.model.shape.head_dim**-0.5, self.device,
                                   cfg.kernels)
        log.info("kernels: %s, %s", type(attention).__name__, self.model.ops.name)
        self.segment = S.SlotSegment(S.SlotLayout(cfg.slot_shape, cfg.num_slots), cfg.shm_name)
        self.slots = DeviceSlots(self.segment, self.device)
        runner = ModelRunner(self.model, attention, self.slots, scratch_block=self.num_blocks,
                             block_size=cfg.block_size, use_graphs=cfg.cuda_graphs)
        self.pipeline = Pipeline(self.slots, runner)
        self.tracer = Tracer(self.device)
        self.link = Link.from_fd(cfg.link_fd)
        self.last_seq = 0

    def _load_model(self) -> LlamaModel:
        source = models.resolve_model(self.cfg.model, self.cfg.cache_dir)
        config = load_config(source.folder)
        if source.random_weights:
            weights = models.random_state_dict(config, self.dtype, self.device, self.cfg.seed)
        else:
            weights = load_weights(source.folder, self.dtype, self.device)
        log.info("loaded %s on %s in %s", source.name, self.device, self.dtype)
        return LlamaModel(config, weights, self.dtype, self.device,
                          ops=make_ops(self.device, self.cfg.kernels))

    def _allocate_cache(self) -> KVCache:
        s: LlamaShape = self.model.shape
        per_block = KVCache.bytes_per_block(
            s.num_layers, self.cfg.block_size, s.num_kv_heads, s.head_dim, self.dtype
        )
        num_blocks = (self.cfg.num_blocks or self._fit_blocks(per_block)) + 1
        log.info("KV cache: %d blocks of %d tokens", num_blocks - 1, self.cfg.block_size)
        return KVCache(s.num_layers, num_blocks, self.cfg.block_size, s.num_kv_heads,
                       s.head_dim, self.dtype, self.device)

    def _fit_blocks(self, per_block: int) -> int:
        """A fixed --kv-cache-gib, else 1 GiB on the CPU, else what the GPU has to spare."""
        if self.cfg.kv_cache_gib is not None or self.device.type != "cuda":
            budget = (self.cfg.kv_cache_gib or 1.0) * 1024**3
        else:
            # the unfused weights the model was built from sit in torch's cache, which the
            # driver counts as used: give it back first, or the KV cache is that much smaller
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.cfg.gpu_memory_utilization)
            budget = free - reserve - 4 * 1024**3  # activations, graphs, logits
        if budget < per_block:
            raise RuntimeError(f"no memory left for the KV cache ({budget / 2**30:.2f} GiB)")
        return int(budget // per_block)

    def warm_up(self) -> None:
        """Run prefills and a decode through the whole path, then capture the graphs.

        On CUDA the prefills span the token budget too: the matrix-product kernels that
        large prefills pick are loaded on first use, which would stall the first real one."""
        view = self.segment.slots[0]
        shape = self.cfg.slot_shape
        n = min(8, shape.max_num_tokens)
        sizes = [n]
        if self.device.type == "cuda":
            largest = min(shape.max_num_tokens, shape.max_blocks_per_row * shape.block_size)
            sizes += sorted({min(512, largest), largest} - {n})
        scratch = self.num_blocks
        batches = [(tokens, 0) for tokens in sizes] + [(1, n)]
        for seq, (tokens, start) in enumerate(batches, start=1):
            # every batch goes through slot 0: its host copy may be rewritten only once the
            # last one has been copied to the device, which waits for the compute before it
            self.pipeline.synchronize()
            _write_warmup_batch(view, seq, tokens, start, scratch, self.cfg.block_size)
            self.pipeline.launch(0, BatchInfo.read(view))
        self.pipeline.synchronize()
        graphs = self.pipeline.capture_graphs()
        log.info("warm-up done; %d CUDA graphs captured", graphs)

    def serve(self) -> None:
        ready = ReadyInfo(self.num_blocks, str(self.device),
                          str(self.dtype).removeprefix("torch."), self.pipeline.ipc_handles())
        self.link.send(Message(Kind.READY, arg=self.num_blocks, payload=ready.encode()))
        while True:
            msg = self.link.recv()
            if msg.kind == Kind.SHUTDOWN:
                self.pipeline.synchronize()
                return
            if msg.kind == Kind.TRACE:
                self._trace(msg)
            elif msg.kind == Kind.RUN:
                self._run(msg.slot, msg.seq)
            else:
                raise RuntimeError(f"unexpected message {msg.kind!r}")

    def _run(self, slot: int, seq: int) -> None:
        info = BatchInfo.read(self.segment.slots[slot])
        if info.seq != seq:
            raise RuntimeError(f"slot {slot} holds batch {info.seq}, doorbell said {seq}")
        if info.num_placeholders and info.prev_seq != self.last_seq:
            raise RuntimeError(f"batch {seq} fills placeholders from batch {info.prev_seq}, "
                               f"but the last batch run was {self.last_seq}")
        if self.tracer.active:
            with self.tracer.step(seq):
                self.pipeline.launch(slot, info)
        else:
            self.pipeline.launch(slot, info)
        self.last_seq = seq
        kind = Kind.ENQUEUED if self.pipeline.is_async else Kind.DONE
        self.link.send(Message(kind, slot=slot, seq=seq, payload=self._timing_payload(seq)))

    def _timing_payload(self, seq: int) -> bytes:
        """The step timing of the newest batch known to be finished: with overlap the
        tokenizer has waited for batch seq-2 before sending seq; on the CPU seq is done."""
        done = seq if not self.pipeline.is_async else seq - 2
        timing = self.pipeline.step_timing(done)
        return StepTiming(done, *timing).encode() if timing else b""

    def _trace(self, msg: Message) -> None:
        summary = {}
        if msg.arg:
            self.tracer.start()
        elif self.tracer.active:
            summary = self.tracer.stop(msg.payload.decode())
        self.link.send(Message(Kind.TRACED, payload=json.dumps(summary).encode()))

    def close(self) -> None:
        self.slots.close()
        self.segment.close()
        self.link.close()


def _write_warmup_batch(view: S.SlotView, seq: int, tokens: int, start: int, block: int,
                        block_size: int) -> None:
    """A one-row batch on the scratch block: ``tokens`` tokens from position ``start``."""
    end = start + tokens
    view.header[:] = 0
    h = view.header
    h[S.H_SEQ], h[S.H_NUM_TOKENS], h[S.H_NUM_ROWS] = seq, tokens, 1
    h[S.H_MAX_QUERY_LEN], h[S.H_MAX_CONTEXT_LEN] = tokens, end
    view.input_ids[:tokens] = np.arange(tokens)
    view.positions[:tokens] = np.arange(start, end)
    view.slot_mapping[:tokens] = block * block_size + np.arange(start, end) % block_size
    view.query_start[:2] = [0, tokens]
    view.context_lens[0] = end
    view.block_tables[0, :] = block
    view.banned_ids[0, :] = -1
    view.bias_ids[0, :] = -1
    view.temperature[0], view.top_p[0], view.top_k[0], view.seed[0] = 1.0, 0.9, 5, 1
    view.min_p[0] = 0.05
