"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked without one: the other
kernel tests run in the interpreter, which compiles nothing (see hopper_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_hopper(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tests.gpu_worker.hopper_compile"],
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(lines) >= 14 and all(line.startswith("ok ") for line in lines), done.stdout
