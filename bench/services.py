"""The processes a Tandem mode runs: one engine, and for ``tandem-gateway`` a gateway in front.

Each is a subprocess that logs to a file, is SERVING (gRPC health) on enter and is stopped
with SIGTERM on exit, so that the device is free before the next mode starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
ENGINE_SERVICE = "tandem.internal.v1.Engine"
GATEWAY_SERVICE = "tandem.v1.Generation"
GATEWAY_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class EngineSpec:
    """How to start one engine for the benchmark."""

    model: str
    is_sync: bool
    is_gpu: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    extra_args: tuple[str, ...] = ()
    start_timeout_s: float = 900.0

    def argv(self, listen: str) -> list[str]:
        args = [sys.executable, "-m", "tokenizer_svc", "--listen", listen, "--model", self.model,
                "--max-num-seqs", str(self.max_num_seqs),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--max-model-len", str(self.max_model_len)]
        if not self.is_gpu:
            args += ["--device", "cpu", "--dtype", "float32"]
        if self.is_sync:
            args.append("--sync")
        # The 32 requests land in one first batch in both modes, so both modes run the same
        # batches and greedy outputs can be compared token for token.
        args += ["--batch-wait-ms", "50"]
        return args + list(self.extra_args)


class ServiceProcess:
    """A subprocess serving ``health_service`` at ``address``; SERVING on enter, stopped on
    exit. Subclasses say which (``name``, ``health_service``) and how long it may take."""

    name = "service"
    health_service = ""
    start_timeout_s = 60.0

    def __init__(self, argv: list[str], address: str, log_path: Path) -> None:
        self.argv, self.address, self.log_path = argv, address, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        request = health_pb2.HealthCheckRequest(service=self.health_service)
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the {self.name} exited early; see {self.log_path}")
                try:
                    reply = health.Check(request, timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} not SERVING after {self.start_timeout_s} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM, then wait (the GPU must be free before the next mode starts)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class EngineProcess(ServiceProcess):
    """An engine (``python -m tokenizer_svc``) on a Unix socket of its own."""

    name = "engine"
    health_service = ENGINE_SERVICE

    def __init__(self, spec: EngineSpec, log_path: Path) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="tandem-bench-")
        address = f"unix://{self.tmp.name}/engine.sock"
        super().__init__(spec.argv(address), address, log_path)
        self.start_timeout_s = spec.start_timeout_s

    def stop(self) -> None:
        super().stop()
        self.tmp.cleanup()


class GatewayProcess(ServiceProcess):
    """A gateway (``python -m gateway``) on a free loopback port, routing to one running
    engine (``--engine``: it spawns none of its own)."""

    name = "gateway"
    health_service = GATEWAY_SERVICE
    start_timeout_s = GATEWAY_START_TIMEOUT_S

    def __init__(self, engine_address: str, log_path: Path,
                 extra_args: tuple[str, ...] = (), http: bool = False) -> None:
        address = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "gateway", "--listen", address, "--engine", engine_address,
                *extra_args]
        self.http_url = None  # with http: the base URL of its OpenAI-compatible API
        if http:
            http_address = f"127.0.0.1:{free_port()}"
            argv += ["--http-listen", http_address]
            self.http_url = f"http://{http_address}/v1"
        super().__init__(argv, address, log_path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
