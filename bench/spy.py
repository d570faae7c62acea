"""``python -m bench.spy FILE...``: summarize py-spy's raw samples (``py-spy record --format
raw --threads``), one file per process: how many samples each thread spent where.

For each file: samples per thread, then the functions that hold the most samples, by
themselves (the innermost frame) and with what they call (inclusive), per thread. Idle
samples are those py-spy records with ``--idle``; without it a thread's samples are its
busy time. ``scripts/device_run.sh host-profile`` records the engine and the worker this
way while a benchmark runs.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path


def parse(lines) -> list[tuple[str, list[str], int]]:
    """(thread, frames outermost first, samples) per line of py-spy's raw format."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        stacks.append((thread, frames, int(count)))
    return stacks


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:123)`` -> ``function (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


def summarize(stacks, top: int = 15) -> dict:
    threads: collections.Counter[str] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    for thread, frames, count in stacks:
        threads[thread] += count
        if not frames:
            continue
        own[thread][frame_name(frames[-1])] += count
        for name in {frame_name(f) for f in frames}:
            inclusive[thread][name] += count
    return {"samples": sum(threads.values()),
            "threads": [{"thread": t, "samples": n, "own": own[t].most_common(top),
                         "inclusive": inclusive[t].most_common(top)}
                        for t, n in threads.most_common()]}


def report(name: str, summary: dict) -> str:
    lines = [f"== {name}: {summary['samples']} samples"]
    for t in summary["threads"]:
        lines.append(f"-- {t['thread']}: {t['samples']} samples")
        lines += [f"   own {n:6d}  {f}" for f, n in t["own"]]
        lines += [f"   inc {n:6d}  {f}" for f, n in t["inclusive"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15, help="functions per thread (15)")
    args = p.parse_args(argv)
    for path in args.files:
        print(report(path.name, summarize(parse(path.read_text().splitlines()), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
