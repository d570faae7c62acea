"""`make run` and `make run-sync` hand the gateway and its engine the flags a user gives.

Reads the commands with `make -n` (nothing runs) and parses them with the real argument
parsers, as the gateway and the engine it spawns would.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.__main__ import config_from_args
from tokenizer_svc.__main__ import parse_args as engine_parse_args

ROOT = Path(__file__).resolve().parents[2]
ENGINE_LISTEN = ["--listen", "unix:///tmp/engine.sock"]  # the supervisor adds it


def gateway_argv(target: str, *variables: str) -> list[str]:
    """The arguments `make <target>` would pass to `python -m gateway`."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    dry_run = subprocess.run([make, "-n", "-C", str(ROOT), target, *variables],
                             capture_output=True, text=True, timeout=60, check=True)
    [line] = [line for line in dry_run.stdout.splitlines() if " -m gateway" in line]
    words = shlex.split(line)
    return words[words.index("gateway") + 1:]


@pytest.mark.parametrize(("target", "is_sync"), [("run", False), ("run-sync", True)])
def test_run_targets_pass_gateway_and_engine_flags(target: str, is_sync: bool) -> None:
    argv = gateway_argv(target, "ARGS=--metrics-port 9401", "ENGINE_ARGS=--metrics-port 9400")
    config = config_from_args(argv)[0]
    assert config.metrics_port == 9401
    engine = engine_parse_args(ENGINE_LISTEN + list(config.spawn.engine_args))
    assert engine.metrics_port == 9400
    assert engine.scheduler.overlap is not is_sync


@pytest.mark.parametrize(("target", "is_sync"), [("run", False), ("run-sync", True)])
def test_run_targets_work_without_flags(target: str, is_sync: bool) -> None:
    config = config_from_args(gateway_argv(target))[0]
    engine = engine_parse_args(ENGINE_LISTEN + list(config.spawn.engine_args))
    assert engine.scheduler.overlap is not is_sync
