"""An in-process tokenizer_svc + gpu_worker pair (no sockets, no gRPC) for tests of
the hand-off: the real scheduler, slot writer, device slots, runner and pipeline."""

from __future__ import annotations

import torch

from gpu_worker.attention import KVCache, make_attention
from gpu_worker.device_slots import DeviceSlots
from gpu_worker.model import LlamaModel, load_config
from gpu_worker.ops import make_ops
from gpu_worker.pipeline import Pipeline
from gpu_worker.runner import BatchInfo, ModelRunner
from tandem import models
from tandem import slots as S
from tokenizer_svc.batch_writer import write_plan
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.request import Request, SamplingOptions
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits

BLOCK_SIZE = 8
NUM_BLOCKS = 64


class Harness:
    def __init__(self, device: str, graphs: bool = False, max_rows: int = 8,
                 kernels: str = "auto") -> None:
        self.device = torch.device(device)
        source = models.resolve_model("random:tiny-llama", models.default_cache_dir())
        config = load_config(source.folder)
        weights = models.random_state_dict(config, torch.float32, self.device, seed=0)
        self.model = LlamaModel(config, weights, torch.float32, self.device,
                                ops=make_ops(self.device, kernels))
        s = self.model.shape
        shape = S.SlotShape(256, max_rows, 256 // BLOCK_SIZE, 4, BLOCK_SIZE)
        self.segment = S.SlotSegment(S.SlotLayout(shape, 2), create=True)
        self.slots = DeviceSlots(self.segment, self.device)
        self.cache = KVCache(s.num_layers, NUM_BLOCKS + 1, BLOCK_SIZE, s.num_kv_heads, s.head_dim,
                             torch.float32, self.device)
        attention = make_attention(self.cache, s.head_dim**-0.5, self.device, kernels)
        self.runner = ModelRunner(self.model, attention, self.slots, NUM_BLOCKS, BLOCK_SIZE,
                                  use_graphs=graphs)
        self.pipeline = Pipeline(self.slots, self.runner)
        self.num_graphs = self.pipeline.capture_graphs() if graphs else 0
        self.blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.scheduler = Scheduler(SchedulerLimits(max_rows, 256, 0), self.blocks)

    def add(self, req_id: str, prompt: list[int], max_tokens: int, **options) -> Request:
        req = Request(req_id, prompt, SamplingOptions(max_tokens, temperature=0.0, **options),
                      arrival=0.0)
        self.scheduler.add(req)
        return req

    def submit(self):
        plan = self.scheduler.schedule()
        if plan is None:
            return None
        slot = plan.seq % 2
        write_plan(self.segment.slots[slot], plan, self.blocks)
        self.pipeline.launch(slot, BatchInfo.read(self.segment.slots[slot]))
        return plan

    def wait(self, plan) -> None:
        if self.pipeline.cuda:
            self.pipeline.d2h_done[plan.seq % 2].synchronize()

    def apply(self, plan) -> None:
        self.wait(plan)
        sampled = self.segment.slots[plan.seq % 2].sampled_ids[: len(plan.rows)].tolist()
        for r, row in enumerate(plan.rows):
            if row.samples and not row.req.finish_reason:
                row.req.pending.popleft()
                row.req.output_ids.append(sampled[r])
                if len(row.req.output_ids) >= row.req.options.max_tokens:
                    row.req.finish_reason = "length"
                    self.scheduler.finish(row.req)

    def run(self, overlap: bool) -> None:
        """Drive everything to completion, like the engine loop."""
        in_flight = []
        while self.scheduler.has_work or in_flight:
            plan = self.submit() if (overlap or not in_flight) else None
            if plan is not None:
                in_flight.append(plan)
            if len(in_flight) > (1 if overlap and plan is not None else 0):
                self.apply(in_flight.pop(0))

    def close(self) -> None:
        self.pipeline.synchronize()
        self.slots.close()
        self.segment.close()
