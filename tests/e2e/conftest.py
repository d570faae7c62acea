"""Session fixtures: the whole service on loopback, in async and sync mode, and
Hugging Face ``generate()`` on the same weights as the reference.

TANDEM_TEST_MODEL / TANDEM_TEST_DEVICE pick another model or device (the GPU
script runs these tests on CUDA with them)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tandem import models
from tests.e2e.service import Service, free_port

MODEL = os.environ.get("TANDEM_TEST_MODEL", "embedded")
DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
BASE_ARGS = ["--model", MODEL, "--device", DEVICE, "--dtype", "float32",
             "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--kv-cache-gib", "0.25"]


PER_REQUEST = ("--engine-streams", "per-request")  # not the default: one stream per request


def _start(request, args, name, gateway_args=()):
    metrics_port = free_port()
    service = Service(BASE_ARGS + args + ["--metrics-port", str(metrics_port)], name,
                      gateway_args)
    service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    request.addfinalizer(service.stop)
    service.wait_serving()
    return service


@pytest.fixture(scope="session")
def model_folder():
    return models.resolve_model(MODEL, models.default_cache_dir()).folder


@pytest.fixture(scope="session")
def async_service(request, model_folder):
    """With the OpenAI-compatible HTTP API too, where aiohttp is installed."""
    http_port = free_port() if importlib.util.find_spec("aiohttp") else None
    http_args = ("--http-listen", f"127.0.0.1:{http_port}") if http_port else ()
    service = _start(request, [], "async", http_args)
    service.http_url = f"http://127.0.0.1:{http_port}/v1" if http_port else None
    return service


@pytest.fixture(scope="session")
def sync_service(request, model_folder):
    return _start(request, ["--sync"], "sync")


@pytest.fixture(scope="session")
def tight_service(request, model_folder):
    """A KV cache so small that concurrent requests must be preempted and recomputed."""
    return _start(request, ["--num-kv-blocks", "20", "--block-size", "8"], "tight")


@pytest.fixture(scope="session")
def small_queue_service(request, model_folder):
    """One request at a time and a waiting queue of one: the third concurrent request
    must be refused."""
    return _start(request, ["--max-num-seqs", "1", "--max-waiting-requests", "1"], "queue")


@pytest.fixture(scope="session")
def per_request_service(request, model_folder):
    """As async_service, but the gateway opens an engine stream per request."""
    return _start(request, [], "per-request", PER_REQUEST)


@pytest.fixture(scope="session")
def async_results(async_service):
    """The greedy requests of test_generation, all streamed at once from async_service."""
    from tests.e2e.test_generation import greedy_requests, run_staggered

    return run_staggered(async_service, greedy_requests())


@pytest.fixture(scope="session")
def hf_model(model_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = models.resolve_model(MODEL, models.default_cache_dir())
    if source.random_weights:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.folder)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        model.load_state_dict(models.random_state_dict(config, torch.float32, DEVICE), strict=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    model = model.to(DEVICE).eval()
    return model, AutoTokenizer.from_pretrained(source.folder)
