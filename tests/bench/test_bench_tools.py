"""bench.spy reads py-spy's raw samples into per-thread counts; every bench tool's --help
works (an unescaped % in a help string once broke ``python -m bench --help``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import spy

RUN, STEP = "_run (tokenizer_svc/engine.py:100)", "_step (tokenizer_svc/engine.py:150)"
RAW = f"""\
thread (1): engine;{RUN};{STEP} 30
thread (1): engine;{RUN};wait (bench/host.py:73) 50
thread (2): MainThread;run (asyncio/runners.py:10);take (tokenizer_svc/server.py:153) 20
thread (1): engine;{RUN};{STEP};_step (tokenizer_svc/engine.py:151) 5
"""


def test_samples_are_counted_per_thread_own_and_inclusive():
    summary = spy.summarize(spy.parse(RAW.splitlines()))
    assert summary["samples"] == 105
    engine, main = summary["threads"]
    assert (engine["thread"], engine["samples"]) == ("thread (1): engine", 85)
    assert dict(engine["own"]) == {"_step (engine.py)": 35, "wait (host.py)": 50}
    inclusive = dict(engine["inclusive"])
    assert inclusive["_run (engine.py)"] == 85
    assert inclusive["_step (engine.py)"] == 35  # a recursive frame counts once per sample
    assert main["samples"] == 20
    assert "engine: 85 samples" in spy.report("x", summary)


@pytest.mark.parametrize("tool", ["bench", "bench.sweep", "bench.gemm", "bench.attention",
                                  "bench.host", "bench.device", "bench.spy", "bench.compare",
                                  "bench.hf_baseline"])
def test_every_bench_tool_prints_its_help(tool):
    done = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True,
                          text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_compare_lines_up_the_variants_sweeps(tmp_path):
    from bench import compare

    def sweep(name, *steps):
        points = [{"batch": b, "context": 1024, "floor_ms": 4.0, "status": "ok", "step_ms": s}
                  for b, s in zip((1, 32), steps, strict=True)]
        points.append({"batch": 256, "context": 1024, "floor_ms": 9.0, "status": "does not fit"})
        path = tmp_path / name
        path.write_text("log line\n" + json.dumps({"decode": points}) + "\n")
        return str(path)

    rows = compare.compare([compare.load(f"off={sweep('a1', 5.0, 6.0)},{sweep('a2', 5.2, 6.0)}"),
                            compare.load(f"on={sweep('b1', 4.9, 5.4)}")])
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 1024), (32, 1024)]
    assert rows[0]["step_ms"] == {"off": pytest.approx(5.1), "on": 4.9}
    assert rows[1]["vs_first"]["on"] == pytest.approx(0.9)
    text = compare.table(["off", "on"], rows)
    assert "0.900x" in text and "74%" in text  # 4.0 of 5.4 ms: the floor's share
    with pytest.raises(SystemExit):
        compare.load("no-files")
