"""The benchmark's arithmetic: plain functions over plain data (numpy, no torch).

Times are microseconds on one clock unless a name says otherwise; an interval array is
``[n, 2]`` of (start, end).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Window = tuple[float, float]  # (start_us, end_us)


def as_intervals(intervals: Any) -> np.ndarray:
    """Any sequence of (start, end) pairs as a float64 array [n, 2]."""
    return np.asarray(intervals, dtype=np.float64).reshape(-1, 2)


def clip_intervals(intervals: Any, window: Window) -> np.ndarray:
    """The parts of ``intervals`` inside ``window``; empty ones dropped."""
    iv = np.clip(as_intervals(intervals), window[0], window[1])
    return iv[iv[:, 1] > iv[:, 0]]


def union_intervals(intervals: Any) -> np.ndarray:
    """Merge overlapping or touching intervals; the result is sorted and disjoint."""
    iv = as_intervals(intervals)
    iv = iv[iv[:, 1] > iv[:, 0]]
    if len(iv) == 0:
        return iv
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    reach = np.maximum.accumulate(iv[:, 1])  # furthest end so far
    is_new = np.ones(len(iv), dtype=bool)
    is_new[1:] = iv[1:, 0] > reach[:-1]
    firsts = np.flatnonzero(is_new)
    return np.column_stack([iv[firsts, 0], np.maximum.reduceat(iv[:, 1], firsts)])


def busy_union(intervals: Any, window: Window) -> np.ndarray:
    """The union of ``intervals`` clipped to ``window``: when the device was busy."""
    return union_intervals(clip_intervals(intervals, window))


def busy_fraction(intervals: Any, window: Window) -> float:
    """Fraction of ``window`` covered by at least one interval (0 for an empty window)."""
    length = window[1] - window[0]
    if length <= 0:
        return 0.0
    merged = busy_union(intervals, window)
    return float((merged[:, 1] - merged[:, 0]).sum() / length)


@dataclass(frozen=True)
class GapStats:
    """Idle gaps of a busy timeline inside its window (leading and trailing ones included)."""

    num_gaps: int
    total_us: float
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float


def _gaps(merged: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the idle gaps around the disjoint sorted intervals ``merged``,
    the leading and trailing ones included; empty gaps dropped."""
    merged = as_intervals(merged)
    edges = np.concatenate([[window[0]], merged.ravel(), [window[1]]])
    starts, lengths = edges[0::2], edges[1::2] - edges[0::2]  # before, between, after
    keep = lengths > 0
    return starts[keep], lengths[keep]


def idle_gaps(merged: np.ndarray, window: Window) -> GapStats:
    """Gaps between the disjoint sorted intervals ``merged`` (from :func:`busy_union`)."""
    _, gaps = _gaps(merged, window)
    if len(gaps) == 0:
        return GapStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    p50, p99 = np.percentile(gaps, [50, 99])
    return GapStats(len(gaps), float(gaps.sum()), float(gaps.mean()), float(p50), float(p99),
                    float(gaps.max()))


GAP_CLASSES_US = (2.0, 50.0, 1000.0)  # upper edges: launch gaps, hand-offs, stalls, long


def _gap_classes() -> list[tuple[float, float]]:
    """(from, below) µs of each gap-size class, the last one open-ended."""
    edges = (0.0, *GAP_CLASSES_US, float("inf"))
    return list(zip(edges[:-1], edges[1:], strict=True))


def idle_by_gap_size(merged: np.ndarray, window: Window, top: int = 5) -> dict[str, Any]:
    """Where the idle time is: count and total of the gaps in each size class (below 2 µs,
    the spacing of kernels in a graph; 2-50 µs, hand-offs such as one batch's graph to the
    next; 50 µs-1 ms and longer, waits on the host), and the ``top`` longest gaps with
    their offset from the window's start."""
    starts, gaps = _gaps(merged, window)
    classes = []
    for lo, hi in _gap_classes():
        chosen = gaps[(gaps >= lo) & (gaps < hi)]
        classes.append({"from_us": lo, "below_us": hi if hi != float("inf") else None,
                        "num_gaps": int(len(chosen)), "total_us": float(chosen.sum())})
    longest = np.argsort(gaps)[::-1][:top]
    return {"classes": classes,
            "longest": [{"offset_us": float(starts[i] - window[0]), "length_us": float(gaps[i])}
                        for i in longest]}


def idle_by_neighbours(merged: np.ndarray, kernels: Any, names: Sequence[str],
                       top: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Which kernels the idle time between the busy intervals ``merged`` (from
    :func:`busy_union`) sits between: for each gap-size class of :func:`idle_by_gap_size`,
    the ``top`` pairs (kernel before the gap → kernel after it) by total idle time.
    ``kernels`` are sorted by start, ``names`` one per kernel."""
    kernels = as_intervals(kernels)
    if len(kernels) == 0:
        return {}
    # the gaps between consecutive merged intervals: after kernel = first to start at the
    # gap's end; before kernel = the last to start before the gap
    gap_start, gap_end = merged[:-1, 1], merged[1:, 0]
    after = np.searchsorted(kernels[:, 0], gap_end, side="left")
    before = np.searchsorted(kernels[:, 0], gap_start, side="left") - 1
    lengths = gap_end - gap_start
    out: dict[str, list[dict[str, Any]]] = {}
    for lo, hi in _gap_classes():
        totals: dict[tuple[str, str], list[float]] = {}
        for i in np.flatnonzero((lengths >= lo) & (lengths < hi) & (lengths > 0)):
            key = (_short(names[before[i]]), _short(names[min(after[i], len(names) - 1)]))
            entry = totals.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += float(lengths[i])
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
        out[f"{lo:g}-{hi:g}us"] = [{"before": b, "after": a, "num_gaps": n, "total_us": t}
                                   for (b, a), (n, t) in ranked]
    return out


def _short(name: str, limit: int = 80) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."


# --- the device timeline of one run ---------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """Decode steps from the worker's per-batch intervals."""

    num_steps: int  # all batches in the window
    num_decode_steps: int  # without prefill batches (longer than 2x the median)
    mean_decode_us: float  # mean duration of a decode step on the device


def step_stats(steps_us: Any) -> StepStats | None:
    """Mean decode-step duration; batches longer than twice the median count as prefill."""
    steps = as_intervals(steps_us)
    if len(steps) == 0:
        return None
    durations = steps[:, 1] - steps[:, 0]
    decode = durations[durations <= 2 * np.median(durations)]
    return StepStats(len(steps), len(decode), float(decode.mean()))


def timeline_slice(merged: np.ndarray, steps_us: Any, window: Window,
                   width_us: float) -> dict[str, Any]:
    """``width_us`` of the timeline centred in ``window``, times relative to the slice."""
    mid = (window[0] + window[1]) / 2
    part = (max(window[0], mid - width_us / 2), min(window[1], mid + width_us / 2))

    def rel(iv: Any) -> list[list[float]]:
        return np.round(clip_intervals(iv, part) - part[0], 2).tolist()

    return {"start_us": part[0] - window[0], "width_us": part[1] - part[0],
            "kernels_us": rel(merged), "steps_us": rel(steps_us)}


def analyse_timeline(trace: dict[str, Any], slice_us: float) -> dict[str, Any]:
    """Busy fraction, idle gaps, decode steps and a slice, from a trace dict as the
    worker writes it: {"device", "window_us", "kernels_us", "steps_us"} and, where known,
    the kernels' names ({"kernel_names", "kernel_name_ids"})."""
    window = (float(trace["window_us"][0]), float(trace["window_us"][1]))
    kernels = as_intervals(trace.get("kernels_us") or [])
    table = trace.get("kernel_names") or []
    names = [table[i] for i in trace.get("kernel_name_ids") or []]
    merged = busy_union(kernels, window)
    length = window[1] - window[0]
    busy = float((merged[:, 1] - merged[:, 0]).sum() / length) if length > 0 else 0.0
    steps = as_intervals(trace.get("steps_us") or [])
    stats = step_stats(clip_intervals(steps, window))
    return {
        "device": trace.get("device", ""),
        "window_s": length / 1e6,
        "num_kernels": len(kernels),
        "busy": busy if len(kernels) else None,
        "idle_gaps": asdict(idle_gaps(merged, window)) if len(kernels) else None,
        "idle_by_gap_size": idle_by_gap_size(merged, window) if len(kernels) else None,
        "idle_by_neighbours": idle_by_neighbours(merged, kernels, names)
        if len(names) == len(kernels) and len(kernels) else None,
        "steps": asdict(stats) if stats else None,
        "slice": timeline_slice(merged, steps, window, slice_us) if len(kernels) else None,
    }


# --- decode cadence seen by the client ------------------------------------------------


def decode_step_seconds(arrivals: Sequence[Sequence[tuple[float, int]]]) -> float | None:
    """Mean time per decode step, averaged over requests.

    ``arrivals[r]`` lists (time_s, num_tokens) of request r's streamed chunks; the first
    chunk ends the prefill, every later token is one decode step.
    """
    per_request = []
    for chunks in arrivals:
        later_tokens = sum(n for _, n in chunks[1:])
        if later_tokens > 0:
            per_request.append((chunks[-1][0] - chunks[0][0]) / later_tokens)
    return float(np.mean(per_request)) if per_request else None


# --- the memory-bandwidth floor of a decode step --------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a decode step reads, for a Llama-family decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(config["num_hidden_layers"], config["hidden_size"],
                   config["intermediate_size"], heads,
                   config.get("num_key_value_heads") or heads, head_dim, config["vocab_size"])

    def decode_weight_params(self) -> int:
        """Parameters a decode step reads: every layer, the final norm and the LM head.

        The embedding table is only gathered (a few rows), so it is left out; the LM
        head is read whole, tied to the embedding or not."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h  # two RMSNorm weights
        return self.num_layers * per_layer + h + self.vocab_size * h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Floor:
    """Bytes a decode step must move, and the time that takes at a given bandwidth."""

    weights_bytes: int
    kv_bytes: int
    bandwidth_bytes_per_s: float
    seconds: float


def decode_floor(shape: ModelShape, dtype_bytes: int, batch: int, avg_context: float,
                 bandwidth_bytes_per_s: float) -> Floor:
    """Weights plus the KV cache of ``batch`` sequences at ``avg_context`` tokens, read once."""
    weights = shape.decode_weight_params() * dtype_bytes
    kv = int(shape.kv_bytes_per_token(dtype_bytes) * batch * avg_context)
    return Floor(weights, kv, bandwidth_bytes_per_s, (weights + kv) / bandwidth_bytes_per_s)


def average_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean context a decode step attends to over a whole generation."""
    return prompt_tokens + new_tokens / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# --- outputs of two modes -------------------------------------------------------------

OUTPUT_BLOCK = 128  # generated tokens per digest in a mode's output_blocks


def output_blocks(outputs: Sequence[Sequence[int]]) -> list[list[str]]:
    """Per request, a short digest of each OUTPUT_BLOCK generated tokens: enough for
    compare_outputs to say which requests two modes disagree on, and from about where."""
    return [[hashlib.sha256(str(list(ids[i:i + OUTPUT_BLOCK])).encode()).hexdigest()[:12]
             for i in range(0, len(ids), OUTPUT_BLOCK)] for ids in outputs]


def compare_outputs(a: Sequence[Sequence[str]] | None,
                    b: Sequence[Sequence[str]] | None) -> dict[str, Any] | None:
    """Two modes' output_blocks: how many requests generated the same tokens, and the first
    block (as a token index) where any request's tokens differ."""
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return {"requests": max(len(a), len(b)), "equal": None, "first_difference": 0}
    firsts = [next(i for i in range(max(len(x), len(y)))
                   if i >= min(len(x), len(y)) or x[i] != y[i])
              for x, y in zip(a, b, strict=True) if list(x) != list(y)]
    return {"requests": len(a), "equal": len(a) - len(firsts),
            "first_difference": min(firsts) * OUTPUT_BLOCK if firsts else None}


# --- one mode's table row -------------------------------------------------------------


def mode_row(mode: str, wall_s: float, arrivals: Sequence[Sequence[tuple[float, int]]],
             timeline: dict[str, Any] | None, nvml: dict[str, Any], notes: list[str],
             expected_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A measured mode as its JSON row; the floor columns are added by the caller."""
    generated = sum(n for chunks in arrivals for _, n in chunks)
    if generated != expected_tokens:
        notes = [*notes, f"generated {generated} tokens, expected {expected_tokens}"]
    step_s = decode_step_seconds(arrivals)
    steps = (timeline or {}).get("steps") or {}
    return {
        "mode": mode, "status": "ok", "notes": notes,
        "wall_s": wall_s, "generated_tokens": generated,
        "tokens_per_s": generated / wall_s if wall_s > 0 else None,
        "step_ms": step_s * 1e3 if step_s is not None else None,
        "device_step_ms": steps["mean_decode_us"] / 1e3 if steps else None,
        "busy_kernels": timeline["busy"] if timeline else None,
        "busy_nvml": nvml.get("busy"),
        "nvml": nvml, "timeline": timeline, **(extra or {}),
    }


def skipped_row(mode: str, status: str, note: str) -> dict[str, Any]:
    """A mode that did not run ("skipped") or broke ("failed")."""
    return {"mode": mode, "status": status, "notes": [note], "tokens_per_s": None,
            "wall_s": None, "step_ms": None, "busy_kernels": None, "busy_nvml": None,
            "timeline": None}
