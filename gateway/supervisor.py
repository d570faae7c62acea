"""Runs one local engine as a child process and keeps it running.

The child is `engine_command --listen unix://<tmpdir>/engine.sock <engine_args>`, in its own
session (so a Ctrl-C at the terminal reaches the gateway only, and the gateway decides when the
child stops). When it exits unexpectedly, `on_exit` is told at once (the gateway marks the
engine down and fails its in-flight requests) and it is restarted after a backoff. After
`max_quick_failures` quick failures in a row, or at once when the child exits with status 2
(argparse's usage error: its flags are wrong, and a restart would fail the same way),
`on_give_up` is told and the gateway exits non-zero. `stop` sends SIGTERM, then SIGKILL
after `terminate_timeout_s`, and reaps the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable

from gateway.config import SpawnConfig

logger = logging.getLogger(__name__)

USAGE_ERROR = 2  # the exit status of a command-line parser that refuses its flags
DIR_PREFIX = "tandem-gateway-"  # then the gateway's pid: <tmp>/tandem-gateway-<pid>-<random>


class EngineSupervisor:
    def __init__(
        self,
        config: SpawnConfig,
        on_exit: Callable[[str], None],
        on_give_up: Callable[[str], None],
    ) -> None:
        self._config = config
        self._on_exit = on_exit
        self._on_give_up = on_give_up
        _remove_dirs_of_dead_gateways()
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        self._socket_path = os.path.join(self._dir, "engine.sock")
        self.address = f"unix://{self._socket_path}"
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The running child's pid, if any."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="engine supervisor")

    async def stop(self) -> None:
        """Stops supervising, terminates the child and waits for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._terminate()
        self._remove_dir()

    def _remove_dir(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._config.restart_backoff_s
        num_quick_failures = 0
        while True:
            started = loop.time()
            reason, returncode = await self._run_once()
            uptime = loop.time() - started
            reason = f"{reason} after {uptime:.1f} s"
            self._on_exit(reason)
            if returncode == USAGE_ERROR:
                logger.error("%s: the engine refused its flags (see its log); giving up", reason)
                self._on_give_up(f"{reason}: the engine refused its flags")
                return
            if uptime >= self._config.stable_after_s:
                num_quick_failures, backoff = 0, self._config.restart_backoff_s
            else:
                num_quick_failures += 1
            if num_quick_failures >= self._config.max_quick_failures:
                logger.error("%s; giving up after %d quick failures", reason, num_quick_failures)
                self._on_give_up(f"{reason}; gave up after {num_quick_failures} quick failures")
                return
            logger.warning("%s; restarting it in %.1f s", reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self._config.max_restart_backoff_s)

    async def _run_once(self) -> tuple[str, int | None]:
        """Starts the child and waits for it to exit; returns why it ended and its status."""
        argv = [*self._config.engine_command, "--listen", self.address,
                *self._config.engine_args]
        _remove_stale_socket(self._socket_path)
        logger.info("starting engine: %s", " ".join(argv))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv, start_new_session=True, preexec_fn=_exit_with_parent(os.getpid()))
        except OSError as exc:
            return f"engine could not be started ({exc})", None
        returncode = await self._process.wait()
        return f"engine process {self._process.pid} exited with code {returncode}", returncode

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        logger.info("stopping engine process %d", process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self._config.terminate_timeout_s)
        except TimeoutError:
            logger.warning("engine process %d ignored SIGTERM; killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


PR_SET_PDEATHSIG = 1


def _exit_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM (a graceful drain) if the gateway dies, even by
    SIGKILL; in its own session, nothing else would stop it and its worker (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the gateway died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _remove_stale_socket(path: str) -> None:
    """Removes the socket file a dead child may have left behind."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_dirs_of_dead_gateways() -> None:
    """Removes the socket folders that gateways killed by SIGKILL (which cleans nothing up)
    left behind: this user's, named after a pid that no longer runs."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            pid = name.removeprefix(DIR_PREFIX).split("-", 1)[0]
            path = os.path.join(root, name)
            if not name.startswith(DIR_PREFIX) or not pid.isdigit() or _is_running(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if os.stat(path).st_uid == os.getuid():
                    shutil.rmtree(path)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
