"""The generated gRPC modules are checked in; they must match what `make proto` makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOS = ["tandem/v1/generation.proto", "tandem/internal/v1/engine.proto"]


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}",
           f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
           *(str(REPO / "protos" / p) for p in PROTOS)]
    subprocess.run(cmd, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        assert (REPO / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run `make proto` and commit the result")


def test_public_api_names():
    from tandem.v1 import generation_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert {m.name for m in service.methods} == {
        "Generate", "GenerateStream", "Tokenize", "GetModelInfo"}
    assert pb.DESCRIPTOR.package == "tandem.v1"
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    inputs = pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in inputs.fields} == {"text", "token_ids", "messages"}
    sampling = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
            "ignore_eos", "logprobs"} <= sampling
