"""Starts the whole service (gateway → tokenizer_svc → gpu_worker) for tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def process_env() -> dict[str, str]:
    """The environment the service's processes run in: this one, with the repo (and
    whatever PYTHONPATH already holds, e.g. wheels carried to a GPU machine) importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A gateway on a loopback port in front of one engine on a Unix socket."""

    def __init__(self, engine_args: list[str], name: str,
                 gateway_args: tuple[str, ...] = (), engine_session: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix=f"tandem-{name}-")
        self.engine_addr = f"unix://{self.tmp.name}/engine.sock"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = process_env()
        log = open(Path(self.tmp.name) / "log.txt", "w")  # noqa: SIM115 - outlives this call
        self.log_path = Path(self.tmp.name) / "log.txt"
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_svc", "--listen", self.engine_addr, *engine_args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=engine_session)  # its own process group: a Ctrl-C to it alone
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--listen", self.address,
             "--engine", self.engine_addr, *gateway_args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.engine_channel = grpc.insecure_channel(self.engine_addr)
        self.engine_stub = engine_pb2_grpc.EngineStub(self.engine_channel)

    def wait_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in (self.engine, self.gateway):
                if proc.poll() is not None:
                    raise RuntimeError(f"a process exited early:\n{self.log_tail()}")
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"service not SERVING after {timeout} s:\n{self.log_tail()}")

    def engine_health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.engine_channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    def stats(self) -> engine_pb2.EngineStats:
        return self.engine_stub.GetStats(engine_pb2.GetStatsRequest(), timeout=10)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def stop(self) -> None:
        self.channel.close()
        self.engine_channel.close()
        for proc in (self.gateway, self.engine):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.gateway, self.engine):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.tmp.cleanup()


def scrape(service: Service) -> dict[str, float]:
    """The engine's Prometheus metrics (the service was started with --metrics-port)."""
    text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+0-9.eEinfNa]+)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values
