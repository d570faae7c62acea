"""`tandem` (tandem.cli) against the fake gateway: streamed text, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tandem import cli
from tandem.client import Client
from tests.clients.fake_gateway import TIMING

REPO = Path(__file__).resolve().parents[2]

INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must lie in (0, 1], got 1.5")
EXPECTED_JSON = {
    "text": "Hello world", "token_ids": [11, 12, 13, 14], "finish_reason": "length",
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "cached_prompt_tokens": 2},
    "timing": {"queue_seconds": TIMING.queue_seconds,
               "first_token_seconds": TIMING.first_token_seconds,
               "total_seconds": TIMING.total_seconds},
    "request_id": "fake-1",
}


def run(fake, capsys, *argv):
    code = cli.main([argv[0], "--address", fake.address, *argv[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_text(fake, capsys):
    code, out, err = run(fake, capsys, "generate", "Hello", "--max-tokens", "8",
                         "--temperature", "0", "--top-p", "0.5", "--top-k", "3", "--min-p", "0.25",
                         "--logit-bias", "5=-100", "--logit-bias", "7=2.5", "--seed", "9",
                         "--stop", "a", "--stop", "b", "--ignore-eos")
    assert (code, out, err) == (0, "Hello world\n", "")
    request = fake.generation.requests[-1]
    assert request.text == "Hello"
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed, list(s.stop),
            s.ignore_eos) == (8, 0.0, 0.5, 3, 0.25, 9, ["a", "b"], True)
    assert dict(s.logit_bias) == {5: -100.0, 7: 2.5}
    assert s.HasField("temperature")


def test_generate_passes_stop_ids_min_tokens_and_penalties(fake, capsys):
    code, _, err = run(fake, capsys, "generate", "Hello", "--stop-token-id", "4",
                       "--stop-token-id", "9", "--min-tokens", "2", "--repetition-penalty", "1.2",
                       "--presence-penalty", "0.5", "--frequency-penalty", "-0.25",
                       "--priority", "-7")
    assert (code, err) == (0, "")
    assert fake.generation.requests[-1].priority == -7
    s = fake.generation.requests[-1].sampling
    assert (list(s.stop_token_ids), s.min_tokens, s.presence_penalty, s.frequency_penalty) == (
        [4, 9], 2, 0.5, -0.25)
    assert s.HasField("repetition_penalty") and s.repetition_penalty == pytest.approx(1.2)
    run(fake, capsys, "generate", "Hello")
    assert not fake.generation.requests[-1].sampling.HasField("repetition_penalty")


def test_generate_flushes_each_delta(fake):
    class Recorder:
        def __init__(self):
            self.events = []

        def write(self, text):
            self.events.append(("write", text))

        def flush(self):
            self.events.append(("flush",))

    args = cli.build_parser(fake.address).parse_args(["generate", "Hi"])
    out = Recorder()
    with Client(fake.address, timeout=10) as client:
        assert cli.run_generate(client, args, out) == 0
    assert out.events == [("write", "Hel"), ("flush",), ("write", "lo"), ("flush",),
                          ("write", " world"), ("flush",), ("write", "\n"), ("flush",)]


def test_generate_json(fake, capsys):
    code, out, err = run(fake, capsys, "generate", "Hello", "--json")
    assert code == 0 and err == ""
    assert json.loads(out) == EXPECTED_JSON
    s = fake.generation.requests[-1].sampling
    assert not s.HasField("temperature") and not s.ignore_eos  # unset flags stay unset


def test_generate_chat(fake, capsys):
    run(fake, capsys, "generate", "--chat", "--system", "Be brief.", "Hi")
    msgs = fake.generation.requests[-1].messages.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "Be brief."), ("user", "Hi")]


def test_api_key_and_address_from_environment(fake, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_ADDRESS", fake.address)
    monkeypatch.setenv("TANDEM_API_KEY", "k1")
    assert cli.main(["generate", "Hello"]) == 0
    assert fake.generation.metadata[-1]["authorization"] == "Bearer k1"
    assert cli.main(["info", "--api-key", "k2"]) == 0
    assert fake.generation.metadata[-1]["authorization"] == "Bearer k2"
    capsys.readouterr()


def test_connection_flags_before_or_after_the_command(fake, capsys):
    assert cli.main(["--address", fake.address, "--api-key", "k1", "info"]) == 0
    assert fake.generation.metadata[-1]["authorization"] == "Bearer k1"
    # after the command wins; one left out there keeps the one given before
    assert cli.main(["--address", "localhost:1", "--api-key", "k1", "generate", "Hello",
                     "--address", fake.address]) == 0
    assert fake.generation.metadata[-1]["authorization"] == "Bearer k1"
    capsys.readouterr()


def test_error_exits_1_with_message_on_stderr(fake, capsys):
    fake.generation.error = INVALID
    code, out, err = run(fake, capsys, "generate", "Hello", "--top-p", "1.5")
    assert (code, out) == (1, "")
    assert err == f"INVALID_ARGUMENT: {INVALID[1]}\n"
    code, out, err = run(fake, capsys, "generate", "Hello", "--json")
    assert (code, out, err) == (1, "", f"INVALID_ARGUMENT: {INVALID[1]}\n")


def test_error_mid_stream_keeps_the_text(fake, capsys):
    fake.generation.error = (grpc.StatusCode.CANCELLED, "the engine restarted")
    fake.generation.error_after = 2
    code, out, err = run(fake, capsys, "generate", "Hello")
    assert (code, out, err) == (1, "Hello\n", "CANCELLED: the engine restarted\n")


def test_tokenize_info_health(fake, capsys):
    code, out, _ = run(fake, capsys, "tokenize", "Hello world")
    assert code == 0 and out.splitlines() == ['1\t"<s>"', '9906\t"Hello"', '1917\t"Ġworld"']
    code, out, _ = run(fake, capsys, "tokenize", "Hello world", "--json")
    assert json.loads(out) == {"token_ids": [1, 9906, 1917], "tokens": ["<s>", "Hello", "Ġworld"]}
    code, out, _ = run(fake, capsys, "info", "--json")
    assert code == 0 and json.loads(out)["model"] == "fake-model"
    code, out, _ = run(fake, capsys, "info")
    assert "vocab_size          1000" in out.splitlines()
    assert run(fake, capsys, "health")[:2] == (0, "SERVING\n")
    fake.health.set("", 2)  # NOT_SERVING
    assert run(fake, capsys, "health")[:2] == (1, "NOT_SERVING\n")


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "Hello", "--max-tokens", "many"])
    assert info.value.code == 2
    assert "--max-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["42", "x=1", "42=much"])
def test_a_logit_bias_that_is_not_id_eq_bias_exits_2(capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "Hello", "--logit-bias", value])
    assert info.value.code == 2
    assert "argument --logit-bias: expected ID=BIAS" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-tokens", "-1"), ("--seed", "-1"),
                                         ("--top-k", "3000000000")])
def test_out_of_range_numbers_exit_2_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "Hello", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be in" in capsys.readouterr().err


def test_runs_as_module(fake):
    fake.generation.error = INVALID
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "Hello",
                           "--address", fake.address], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"INVALID_ARGUMENT: {INVALID[1]}\n"
