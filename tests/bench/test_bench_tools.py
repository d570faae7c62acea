"""bench.spy reads py-spy's raw samples into per-thread counts; every bench tool's --help
works (an unescaped % in a help string once broke ``python -m bench --help``)."""

from __future__ import annotations

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
                                  "bench.host", "bench.device", "bench.spy",
                                  "bench.hf_baseline"])
def test_every_bench_tool_prints_its_help(tool):
    done = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True,
                          text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
