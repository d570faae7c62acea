from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from tests.clients.fake_gateway import FakeGateway


@pytest.fixture(scope="session")
def gateway_server():
    server = FakeGateway()
    yield server
    server.stop()


@pytest.fixture
def fake(gateway_server):
    """The fake gateway, its canned answers and records reset for each test."""
    gateway_server.generation.reset()
    gateway_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    return gateway_server
