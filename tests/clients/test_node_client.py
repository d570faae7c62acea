"""clients/node (generate.js) against the fake gateway: the request it builds from its flags,
its output, and its JSON, which must match `tandem generate --json`. Skipped without Node.js
or without `npm ci` in clients/node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from tandem import cli

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules").is_dir(),
                       reason="clients/node/node_modules is missing: run `npm ci` in clients/node"),
]


def node(fake, *args):
    return subprocess.run([NODE, str(NODE_DIR / "generate.js"), "--address", fake.address, *args],
                          capture_output=True, text=True, timeout=60)


def test_flags_become_the_request(fake):
    proc = node(fake, "--max-tokens", "8", "--temperature", "0", "--top-p", "0.5", "--top-k", "3",
                "--min-p", "0.25", "--seed", "18446744073709551615", "--stop", "a", "--stop", "b",
                "--ignore-eos", "--logit-bias", "5=-100", "--logit-bias", "7=2.5",
                "--api-key", "k1", "Hello")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Hello world\n", "")
    request = fake.generation.requests[-1]
    assert request.text == "Hello"
    s = request.sampling
    assert s.HasField("temperature") and s.temperature == 0  # greedy, not "unset"
    assert (s.max_tokens, s.top_p, s.top_k, s.min_p, s.seed, list(s.stop), s.ignore_eos) == (
        8, 0.5, 3, 0.25, 2**64 - 1, ["a", "b"], True)
    assert dict(s.logit_bias) == {5: -100.0, 7: 2.5}
    assert fake.generation.metadata[-1]["authorization"] == "Bearer k1"


def test_unset_flags_stay_unset_and_chat(fake):
    assert node(fake, "--chat", "Hi").returncode == 0
    request = fake.generation.requests[-1]
    assert [(m.role, m.content) for m in request.messages.messages] == [("user", "Hi")]
    assert not request.sampling.HasField("temperature") and not request.sampling.HasField("seed")
    assert "authorization" not in fake.generation.metadata[-1]


def test_the_library_continues_a_final_assistant_message(fake):
    script = ("const { Client } = require(process.argv[1]);"
              "const c = new Client(process.argv[2]);"
              "c.generate([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: '{' }],"
              " { max_tokens: 4 }, { continueFinalMessage: true })"
              ".then((out) => { console.log(out.text); c.close(); });")
    proc = subprocess.run([NODE, "-e", script, str(NODE_DIR / "tandem.js"), fake.address],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Hello world\n", "")
    chat = fake.generation.requests[-1].messages
    assert chat.continue_final_message and chat.messages[-1].content == "{"


def test_stop_ids_min_tokens_and_penalties_become_the_request(fake):
    proc = node(fake, "--stop-token-id", "4", "--stop-token-id", "9", "--min-tokens", "2",
                "--repetition-penalty", "1.25", "--presence-penalty", "0.5",
                "--frequency-penalty=-0.25", "--priority=-7", "Hello")  # negative: with =
    assert (proc.returncode, proc.stderr) == (0, "")
    assert fake.generation.requests[-1].priority == -7
    s = fake.generation.requests[-1].sampling
    assert (list(s.stop_token_ids), s.min_tokens, s.repetition_penalty, s.presence_penalty,
            s.frequency_penalty) == ([4, 9], 2, 1.25, 0.5, -0.25)
    assert s.HasField("repetition_penalty")


def test_a_logit_bias_that_is_not_id_eq_bias_exits_2(fake):
    proc = node(fake, "--logit-bias", "42", "Hello")
    assert proc.returncode == 2 and "--logit-bias: expected ID=BIAS" in proc.stderr


def test_stream_and_json_match_the_python_cli(fake, capsys):
    assert cli.main(["generate", "Hello", "--json", "--address", fake.address]) == 0
    python_json = json.loads(capsys.readouterr().out)
    whole = node(fake, "--json", "Hello")
    streamed = node(fake, "--json", "--stream", "Hello")
    assert json.loads(whole.stdout) == python_json
    assert json.loads(streamed.stdout) == python_json
    assert fake.generation.requests[-1].text == "Hello"
    plain = node(fake, "--stream", "Hello")
    assert (plain.returncode, plain.stdout) == (0, "Hello world\n")


def test_error_exits_1_with_message_on_stderr(fake):
    fake.generation.error = (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must lie in (0, 1]")
    for extra in ([], ["--stream"]):
        proc = node(fake, *extra, "Hello")
        assert (proc.returncode, proc.stdout) == (1, "")
        assert proc.stderr == "INVALID_ARGUMENT: sampling.top_p: must lie in (0, 1]\n"
