"""The benchmark's outputs: the printed table, ``bench.json`` and ``bench.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.analysis import OUTPUT_BLOCK, compare_outputs, ratio

COLUMNS = (  # (header, row key, format)
    ("mode", "mode", "{}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("wall s", "wall_s", "{:.2f}"),
    ("busy% (kernels)", "busy_kernels", "{:.1%}"),
    ("busy% (NVML)", "busy_nvml", "{:.1%}"),
    ("step ms", "step_ms", "{:.2f}"),
    ("floor ms", "floor_ms", "{:.2f}"),
    ("floor/step", "floor_over_step", "{:.2f}"),
)
NOT_MEANINGFUL = "CPU SMOKE RUN: these numbers mean nothing for performance."
GATEWAY_TARGET = 0.95  # the gateway must keep this share of the engine's own tokens/s


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return row["status"] if key == "tokens_per_s" and row["status"] != "ok" else "n/a"
    return fmt.format(value)


def _busy(row: dict[str, Any] | None) -> tuple[float | None, str]:
    if row is None:
        return None, ""
    if row.get("busy_kernels") is not None:
        return row["busy_kernels"], "kernels"
    return row.get("busy_nvml"), "NVML"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Async-vs-sync speed-ups, the ceiling that the sync run's idle time allows, and the
    share of the engine's own (tandem-async) throughput that the gateway keeps."""
    by_mode = {row["mode"]: row for row in rows if row["status"] == "ok"}

    def tps(mode: str) -> float | None:
        return by_mode.get(mode, {}).get("tokens_per_s")

    busy, source = _busy(by_mode.get("tandem-sync"))
    source = source if busy else None
    return {
        "tandem_async_speedup": ratio(tps("tandem-async"), tps("tandem-sync")),
        "hf_async_speedup": ratio(tps("hf-async"), tps("hf-sync")),
        "tandem_async_over_hf_async": ratio(tps("tandem-async"), tps("hf-async")),
        "sync_busy_ceiling": ratio(1.0, busy) if busy else None,
        "sync_busy_source": source,
        "gateway_over_engine": ratio(tps("tandem-gateway"), tps("tandem-async")),
        "http_over_engine": ratio(tps("tandem-http"), tps("tandem-async")),
        "tandem_async_outputs_equal_sync": _same_outputs(by_mode, "tandem-async", "tandem-sync"),
        "tandem_gateway_outputs_equal_async": _same_outputs(by_mode, "tandem-gateway",
                                                            "tandem-async"),
        "tandem_async_vs_sync_outputs": _compared(by_mode, "tandem-async", "tandem-sync"),
        "tandem_gateway_vs_async_outputs": _compared(by_mode, "tandem-gateway",
                                                     "tandem-async"),
        "tandem_http_outputs_equal_async": _same_outputs(by_mode, "tandem-http", "tandem-async"),
        "tandem_http_vs_async_outputs": _compared(by_mode, "tandem-http", "tandem-async"),
    }


def _same_outputs(by_mode: dict[str, dict[str, Any]], mode: str, other: str) -> bool | None:
    digests = [by_mode.get(m, {}).get("outputs_sha256") for m in (mode, other)]
    return None if None in digests else digests[0] == digests[1]


def _compared(by_mode: dict[str, dict[str, Any]], mode: str,
              other: str) -> dict[str, Any] | None:
    return compare_outputs(*(by_mode.get(m, {}).get("output_blocks") for m in (mode, other)))


def format_table(result: dict[str, Any]) -> str:
    device, wl = result["device"], result["workload"]
    lines = [(f"Tandem bench on {device['name']} ({device['kind']}, torch {device['torch']}); "
              f"model {result['model']['spec']}, {wl['num_requests']} requests x "
              f"{wl['prompt_tokens']} prompt + {wl['new_tokens']} new tokens")]
    if not result["meaningful"]:
        lines.append(NOT_MEANINGFUL)
    cells = [[h for h, _, _ in COLUMNS]]
    cells += [[_cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in result["modes"]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=False))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += _summary_lines(result)
    lines += sweep_lines(result.get("sweep"))
    return "\n".join(lines)


def sweep_lines(sweep: dict[str, Any] | None) -> list[str]:
    """Decode step time against the floor per batch and context; prefill against matmul."""
    if not sweep:
        return []
    if sweep["status"] != "ok":
        return [f"sweep: {sweep['status']} ({sweep.get('note', '')})"]
    contexts = sorted({p["context"] for p in sweep["decode"]})
    by_point = {(p["batch"], p["context"]): p for p in sweep["decode"]}
    lines = [f"Decode step, ms (floor/step), {sweep['model']} {sweep['dtype']}, "
             f"{sweep['attention']}; bandwidth {sweep['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s",
             "batch  " + "  ".join(f"{f'ctx {c}':>16}" for c in contexts)]
    for batch in sorted({p["batch"] for p in sweep["decode"]}):
        cells = []
        for c in contexts:
            p = by_point[(batch, c)]
            cells.append(f"{p['step_ms']:8.2f} ({p['floor_over_step']:4.0%})"
                         if p["status"] == "ok" else f"{p['status']:>16}")
        lines.append(f"{batch:>5}  " + "  ".join(f"{c:>16}" for c in cells))
    pre = sweep["prefill"]
    lines.append(f"Prefill {pre['rows']} x {pre['tokens']} tokens: {pre['ms']:.1f} ms, "
                 f"{pre['tokens_per_s']:.0f} tok/s, {pre['flops_per_s'] / 1e12:.0f} TFLOP/s = "
                 f"{pre['over_matmul']:.0%} of the measured matmul rate "
                 f"({pre['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s)")
    if not sweep["meaningful"]:
        lines.append(NOT_MEANINGFUL)
    return lines


def _summary_lines(result: dict[str, Any]) -> list[str]:
    s, floor = result["summary"], result["floor"]
    lines = [(f"floor: {floor['weights_bytes'] / 1e9:.2f} GB weights + "
              f"{floor['kv_bytes'] / 1e9:.2f} GB KV at context {floor['avg_context']:.0f}, "
              f"over {floor['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s measured")]

    def x(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}x"

    lines.append(f"Tandem async vs sync: {x(s['tandem_async_speedup'])} "
                 f"(ceiling from the sync run's idle time: {x(s['sync_busy_ceiling'])}"
                 f"{', by ' + s['sync_busy_source'] if s['sync_busy_source'] else ''})")
    lines.append(f"HF async vs sync: {x(s['hf_async_speedup'])}; "
                 f"Tandem async vs HF async: {x(s['tandem_async_over_hf_async'])}")
    lines.append(f"Tandem through the gateway vs the engine's own (async): "
                 f"{x(s.get('gateway_over_engine'))} (target {GATEWAY_TARGET:.2f}x)")
    lines.append(f"Tandem through the gateway's HTTP API vs the engine's own (async): "
                 f"{x(s.get('http_over_engine'))}")
    lines.append(f"Tandem async outputs equal sync: "
                 f"{_same(s, 'tandem_async', 'sync')}; gateway outputs equal async: "
                 f"{_same(s, 'tandem_gateway', 'async')}; HTTP outputs equal async: "
                 f"{_same(s, 'tandem_http', 'async')}")
    for row in result["modes"]:
        lines += [f"note [{row['mode']}]: {note}" for note in row.get("notes", [])]
        lines += _idle_line(row)
    return lines


def _idle_line(row: dict[str, Any]) -> list[str]:
    """Where an async mode's idle time is, by gap size (kernel timeline)."""
    by_size = (row.get("timeline") or {}).get("idle_by_gap_size")
    if not by_size or row["mode"] == "tandem-sync":
        return []
    parts = [f"{c['total_us'] / 1e3:.1f} ms in {c['num_gaps']} gaps of "
             + (f"{c['from_us']:g}-{c['below_us']:g} us" if c["below_us"]
                else f">= {c['from_us']:g} us")
             for c in by_size["classes"] if c["num_gaps"]]
    return [f"idle [{row['mode']}]: " + "; ".join(parts)]


def _same(summary: dict[str, Any], mode: str, other: str) -> str:
    """yes / NO / n/a, and for NO how many requests differ and from which token on."""
    same = summary.get(f"{mode}_outputs_equal_{other}")
    compared = summary.get(f"{mode}_vs_{other}_outputs")
    if same is None:
        return "n/a"
    if same or not compared or compared["equal"] is None:
        return "yes" if same else "NO"
    start = compared["first_difference"]
    return (f"NO ({compared['requests'] - compared['equal']} of {compared['requests']} "
            f"requests differ, the first from tokens {start}-{start + OUTPUT_BLOCK - 1})")


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def draw_png(result: dict[str, Any], path: Path) -> str | None:
    """Throughput bars and timeline slices; None once drawn, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.unlink(missing_ok=True)  # no stale picture beside a new bench.json
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    lanes = [row for row in result["modes"] if (row.get("timeline") or {}).get("slice")]
    sweep = result.get("sweep") or {}
    has_sweep = sweep.get("status") == "ok"
    ratios = [3, 2 + len(lanes)] + ([3] if has_sweep else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 4 + 0.6 * max(1, len(lanes)) +
                                                      3 * has_sweep),
                             gridspec_kw={"height_ratios": ratios})
    _draw_bars(axes[0], result)
    _draw_timeline(axes[1], lanes)
    if has_sweep:
        _draw_sweep(axes[2], sweep)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _draw_bars(ax, result: dict[str, Any]) -> None:
    rows = [row for row in result["modes"] if row.get("tokens_per_s")]
    names = [row["mode"] for row in rows]
    values = [row["tokens_per_s"] for row in rows]
    ax.bar(names, values, color=["#1f77b4" if n.startswith("tandem") else "#999999"
                                 for n in names])
    for i, value in enumerate(values):
        ax.annotate(f"{value:.0f}", (i, value), ha="center", va="bottom")
    title = f"{result['model']['spec']} on {result['device']['name']}: generated tokens/s"
    ax.set_title(title + ("" if result["meaningful"] else f"\n{NOT_MEANINGFUL}"))
    ax.set_ylabel("tokens/s")
    ax.margins(y=0.15)


def _draw_sweep(ax, sweep: dict[str, Any]) -> None:
    """Decode step: share of the bandwidth floor reached, per batch, one line per context."""
    batches = sorted({p["batch"] for p in sweep["decode"]})
    where = {batch: i for i, batch in enumerate(batches)}  # evenly spaced, labelled
    for context in sorted({p["context"] for p in sweep["decode"]}):
        points = [p for p in sweep["decode"] if p["context"] == context and p["status"] == "ok"]
        ax.plot([where[p["batch"]] for p in points], [p["floor_over_step"] for p in points],
                marker="o", label=f"context {context}")
    ax.set_xticks(range(len(batches)), [str(batch) for batch in batches])
    ax.axhline(1.0, color="#999999", linewidth=0.8)
    ax.set_title(f"decode step: floor / measured ({sweep['attention']})")
    ax.set_xlabel("batch")
    ax.set_ylabel("floor / step")
    shares = [p["floor_over_step"] for p in sweep["decode"] if p["status"] == "ok"]
    ax.set_ylim(0, max([1.05, *(share + 0.05 for share in shares)]))  # 101% can happen
    ax.legend(loc="lower right", fontsize="small")


def _draw_timeline(ax, lanes: list[dict[str, Any]]) -> None:
    if not lanes:
        ax.text(0.5, 0.5, "no kernel timeline (no GPU, or the engine has no trace)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for i, row in enumerate(lanes):
        part = row["timeline"]["slice"]
        ms = [(s / 1e3, (e - s) / 1e3) for s, e in part["kernels_us"]]
        ax.broken_barh(ms, (i + 0.3, 0.5), color="#2ca02c", linewidth=0)
        steps = [(s / 1e3, (e - s) / 1e3) for s, e in part["steps_us"]]
        ax.broken_barh(steps, (i + 0.1, 0.12), color="#ff7f0e", linewidth=0)
    ax.set_yticks([i + 0.55 for i in range(len(lanes))], [row["mode"] for row in lanes])
    width_ms = max(row["timeline"]["slice"]["width_us"] for row in lanes) / 1e3
    ax.set_xlim(0, width_ms)
    ax.invert_yaxis()  # modes top-down in run order
    ax.set_xlabel("ms (a slice from the middle of the measured window; green: kernels, "
                  "orange: worker steps, white: GPU idle)")
