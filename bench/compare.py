"""``python -m bench.compare LABEL=FILE[,FILE...] ...``: decode sweeps side by side.

Each argument names one variant and the ``python -m bench.sweep`` JSON files measured with
it (runs of the variants alternated on one machine, so that drift in the card's state
falls on both). Prints, per (batch, context), each variant's mean step time and share of
the floor, and each variant's time against the first's; JSON on the last line.
``scripts/device_run.sh ab`` runs the sweeps and this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(spec: str) -> tuple[str, list[dict]]:
    label, _, files = spec.partition("=")
    if not label or not files:
        raise SystemExit(f"{spec!r}: want LABEL=FILE[,FILE...]")
    return label, [json.loads(Path(f).read_text().strip().splitlines()[-1])
                   for f in files.split(",")]


def compare(variants: list[tuple[str, list[dict]]]) -> list[dict]:
    """One row per (batch, context) that every variant measured."""
    times: dict[tuple[int, int], dict[str, list[float]]] = {}
    floors: dict[tuple[int, int], float] = {}
    for label, sweeps in variants:
        for sweep in sweeps:
            for point in sweep["decode"]:
                if point.get("status") == "ok":
                    key = (point["batch"], point["context"])
                    times.setdefault(key, {}).setdefault(label, []).append(point["step_ms"])
                    floors[key] = point["floor_ms"]
    labels = [label for label, _ in variants]
    rows = []
    for key in sorted(times):
        if set(times[key]) != set(labels):
            continue
        means = {label: statistics.fmean(times[key][label]) for label in labels}
        rows.append({"batch": key[0], "context": key[1], "floor_ms": floors[key],
                     "step_ms": means, "runs": {lb: times[key][lb] for lb in labels},
                     "vs_first": {lb: means[lb] / means[labels[0]] for lb in labels}})
    return rows


def table(labels: list[str], rows: list[dict]) -> str:
    head = "batch  context  " + "  ".join(f"{lb:>18}" for lb in labels)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{r['step_ms'][lb]:6.3f} ms {r['floor_ms'] / r['step_ms'][lb]:4.0%}"
                 + (f" {r['vs_first'][lb]:5.3f}x" if i else "       ")
                 for i, lb in enumerate(labels)]
        lines.append(f"{r['batch']:5d}  {r['context']:7d}  " + "  ".join(
            f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="LABEL=FILE[,FILE...]")
    variants = [load(spec) for spec in p.parse_args(argv).variants]
    rows = compare(variants)
    print(table([label for label, _ in variants], rows))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
