"""`tandem`: Tandem's command-line client.

    tandem generate "Once upon a time" --max-tokens 32      # streams the text as it comes
    tandem generate --chat "What is 2+2?" --json            # one JSON object at the end
    tandem tokenize "Hello world"
    tandem info
    tandem health

Exit status: 0 on success, 1 when the server answers with an error (its code and message go to
stderr) or, for `health`, when it is not SERVING; 2 for bad command-line arguments.
`TANDEM_ADDRESS` and `TANDEM_API_KEY` give the defaults of `--address` and `--api-key`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tandem.client import DEFAULT_ADDRESS, Client, Completion, Delta, TandemError


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ
    parser = build_parser(env.get("TANDEM_ADDRESS") or DEFAULT_ADDRESS, env.get("TANDEM_API_KEY"))
    args = parser.parse_args(argv)
    try:
        with connect(args) as client:
            return args.run(client, args, sys.stdout)
    except TandemError as error:
        sys.stdout.flush()
        print(error, file=sys.stderr)
        return 1
    except ValueError as error:  # an input the client refuses before sending
        parser.error(str(error))
    except KeyboardInterrupt:
        return 130


def build_parser(default_address: str,
                 default_api_key: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Talk to a Tandem server.")
    add_connection_flags(parser, default_address, default_api_key)
    # The same flags after the command (`tandem generate ... --address H:P`), where a flag
    # left out keeps what was given before the command (`tandem --address H:P generate ...`).
    conn = argparse.ArgumentParser(add_help=False)
    add_connection_flags(conn, default_address, default_api_key, keep_earlier=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", parents=[conn], help="generate a completion",
                              description="Stream a completion to stdout as it is generated.")
    gen.add_argument("prompt", help='the prompt ("-": read it from stdin)')
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message, with the model's chat template")
    gen.add_argument("--system", help="with --chat: a system message first")
    gen.add_argument("--max-tokens", type=_bounded(0, 2**32 - 1), metavar="N")
    gen.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    gen.add_argument("--top-p", type=float, metavar="P")
    gen.add_argument("--top-k", type=_bounded(0, 2**31 - 1), metavar="K")
    gen.add_argument("--min-p", type=float, metavar="P",
                     help="drop tokens below P times the most likely one's probability")
    gen.add_argument("--logit-bias", type=_token_bias, action="append", metavar="ID=BIAS",
                     help="add BIAS (-100 to 100) to token ID's logit (repeatable)")
    gen.add_argument("--seed", type=_bounded(0, 2**64 - 1), metavar="S")
    gen.add_argument("--stop", action="append", metavar="STR", help="a stop string (repeatable)")
    gen.add_argument("--stop-token-id", type=_bounded(0, 2**31 - 1), action="append",
                     metavar="ID", help="a token id that ends the completion (repeatable)")
    gen.add_argument("--min-tokens", type=_bounded(0, 2**32 - 1), metavar="N",
                     help="no end-of-sequence or stop token before N tokens")
    gen.add_argument("--repetition-penalty", type=float, metavar="F",
                     help="over prompt and output (1: off)")
    gen.add_argument("--presence-penalty", type=float, metavar="F", help="over the output, -2 to 2")
    gen.add_argument("--frequency-penalty", type=float, metavar="F",
                     help="over the output, -2 to 2")
    gen.add_argument("--priority", type=_bounded(-2**31, 2**31 - 1), default=0, metavar="N",
                     help="scheduling priority: higher goes first (default: 0)")
    gen.add_argument("--ignore-eos", action="store_true", default=None,
                     help="keep generating past end-of-sequence tokens")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object at the end instead of streaming text")
    gen.set_defaults(run=run_generate)

    tok = commands.add_parser("tokenize", parents=[conn], help="show how a text is tokenized")
    tok.add_argument("prompt", help='the text ("-": read it from stdin)')
    tok.add_argument("--chat", action="store_true", help="as a user message, chat template applied")
    tok.add_argument("--json", action="store_true", help="print a JSON object")
    tok.set_defaults(run=run_tokenize)

    info = commands.add_parser("info", parents=[conn], help="describe the model being served")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(run=run_info)

    health = commands.add_parser("health", parents=[conn],
                                 help="the server's health status (exit 1 unless SERVING)")
    health.add_argument("--service", default="", help='the service to check (default: "")')
    health.set_defaults(run=run_health)
    return parser


def add_connection_flags(parser: argparse.ArgumentParser, default_address: str,
                         default_api_key: str | None, *, keep_earlier: bool = False) -> None:
    """--address, --api-key, --tls, --root-certificates, --timeout. keep_earlier: a flag left
    out sets nothing, so the value given before the command (or the default) stays."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep_earlier else value
    parser.add_argument("--address", default=default(default_address),
                        help=f"the gateway, host:port (default: {default_address})")
    parser.add_argument("--api-key", default=default(default_api_key),
                        help="sent as 'authorization: Bearer KEY' (default: $TANDEM_API_KEY)")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect over TLS")
    parser.add_argument("--root-certificates", metavar="PEM_FILE", default=default(None),
                        help="trust these CA certificates (implies --tls)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", default=default(None),
                        help="deadline of the call")


def _bounded(low: int, high: int):
    """An argparse type: an integer in [low, high], else a usage error naming the flag."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _token_bias(text: str) -> tuple[int, float]:
    """An argparse type: ID=BIAS, a token id and the bias added to its logit."""
    token_id, sep, bias = text.partition("=")
    try:
        if sep:
            return int(token_id), float(bias)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected ID=BIAS, like 42=-100, got {text!r}")


def connect(args: argparse.Namespace) -> Client:
    root = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as f:
            root = f.read()
    return Client(args.address, api_key=args.api_key, tls=args.tls, root_certificates=root,
                  timeout=args.timeout)


def input_of(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt as `prompt=` or, with --chat, as `messages=`."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.chat:
        return {"prompt": prompt}
    system = getattr(args, "system", None)
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": prompt}]}


def run_generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed,
                "stop": args.stop, "ignore_eos": args.ignore_eos,
                "logit_bias": dict(args.logit_bias) if args.logit_bias else None,
                "stop_token_ids": args.stop_token_id, "min_tokens": args.min_tokens,
                "repetition_penalty": args.repetition_penalty,
                "presence_penalty": args.presence_penalty,
                "frequency_penalty": args.frequency_penalty}
    request = {**input_of(args), "priority": args.priority, **sampling}
    if args.json:
        print(json.dumps(completion_json(client.generate(**request))), file=out)
        return 0
    text = ""
    try:
        for delta in client.stream(**request):
            out.write(delta.text)
            out.flush()
            text += delta.text
    finally:
        if text and not text.endswith("\n"):
            out.write("\n")
            out.flush()
    return 0


def completion_json(completion: Completion | Delta) -> dict[str, Any]:
    """The `--json` object: text, token_ids, finish_reason, usage, timing, request_id."""
    return {
        "text": completion.text,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "usage": {"prompt_tokens": completion.prompt_tokens,
                  "completion_tokens": completion.completion_tokens,
                  "cached_prompt_tokens": completion.cached_prompt_tokens},
        "timing": dataclasses.asdict(completion.timing) if completion.timing else None,
        "request_id": completion.request_id,
    }


def run_tokenize(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    tokens = client.tokenize(**input_of(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(tokens)), file=out)
    else:
        for token_id, piece in zip(tokens.token_ids, tokens.tokens, strict=True):
            print(f"{token_id}\t{json.dumps(piece, ensure_ascii=False)}", file=out)
    return 0


def run_info(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = dataclasses.asdict(client.model_info())
    if args.json:
        print(json.dumps(info), file=out)
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}", file=out)
    return 0


def run_health(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    status = client.health(args.service)
    print(status, file=out)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
