"""A stand-in for `python -m tokenizer_svc`, run as the gateway's child process in tests.

    python gateway_fake_engine_proc.py --listen ADDR [--pid-file F] [--args-file F]
        [--exit-code N] [--ignore-sigterm] [--hang] [--hold-last-file F]

Serves the fake Engine and health (SERVING at once) until SIGTERM, or exits at once with
--exit-code. Writes its pid and its argv to the given files. With --hold-last-file, the last
chunk of each Generate stream waits until that file exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from gateway_fakes import start_fake_engine  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--pid-file")
    parser.add_argument("--args-file")
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--hang", action="store_true", help="Generate streams never finish")
    parser.add_argument("--hold-last-file", help="hold last chunks until this file exists")
    return parser.parse_args()


async def serve(args: argparse.Namespace) -> None:
    running = await start_fake_engine(args.listen)
    running.engine.hang = args.hang
    if args.hold_last_file:
        running.engine.hold_last = asyncio.Event()
        asyncio.get_running_loop().create_task(
            _set_when_file_exists(running.engine.hold_last, args.hold_last_file))
    stop = asyncio.Event()
    if not args.ignore_sigterm:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.server.stop(0)


async def _set_when_file_exists(event: asyncio.Event, path: str) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.02)
    event.set()


def main() -> int:
    args = parse_args()
    if args.pid_file:
        with open(args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")
    if args.args_file:
        with open(args.args_file, "w") as f:
            json.dump(sys.argv[1:], f)
    if args.exit_code is not None:
        return args.exit_code
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
