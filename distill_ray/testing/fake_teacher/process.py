"""Running the fake teacher: ``serve`` in this process, ``FakeTeacher`` in a subprocess for a ``with`` block."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from distill_ray.testing.fake_teacher.config import FakeTeacherConfig
from distill_ray.testing.fake_teacher.server import FakeTeacherServer

PACKAGE_PARENT = Path(__file__).resolve().parents[3]  # the folder that holds distill_ray/



# Running it.


async def serve(config: FakeTeacherConfig, host: str = "127.0.0.1", port: int = 0,
                exit_with_parent: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or, with ``exit_with_parent``, until stdin closes). Prints the port first."""
    server = FakeTeacherServer(config)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(json.dumps({"port": bound, "base_url": f"http://{host}:{bound}/v1", "pid": os.getpid()}), flush=True)
    sys.stdout = sys.stderr  # the parent reads one line and may close the pipe; nothing else goes there

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if exit_with_parent:  # stdin is a pipe from the parent: EOF means the parent is gone
        class _ParentWatch(asyncio.Protocol):
            def connection_lost(self, exc):
                stop.set()

        await loop.connect_read_pipe(_ParentWatch, sys.stdin)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="FakeTeacherConfig as JSON, e.g. '{\"rpm\": 60}'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when stdin reaches EOF")
    args = parser.parse_args(argv)
    asyncio.run(serve(FakeTeacherConfig.from_json(args.config), args.host, args.port, args.exit_with_parent))


class FakeTeacher:
    """Runs the fake teacher in a subprocess for the length of a ``with`` block.

    Args:
        config: The behaviour knobs (default: a fast, well-behaved teacher).
        startup_timeout_s: How long to wait for the server to listen and answer ``/health``.

    Raises:
        RuntimeError: The server did not come up (its exit code and stderr say why).
    """

    def __init__(self, config: FakeTeacherConfig | None = None, startup_timeout_s: float = 30.0):
        self.config = config or FakeTeacherConfig()
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def start(self) -> FakeTeacher:
        # distill_ray from where this copy of it is, and the caller's folder for an answer_fn of its own
        path = [str(PACKAGE_PARENT), os.getcwd(), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        command = [sys.executable, "-m", "distill_ray.testing.fake_teacher", "--config", self.config.to_json(),
                   "--port", "0", "--exit-with-parent"]
        # stderr goes to a file: read back if the server fails to start, and never a pipe that fills up.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            line = self._first_line(deadline)
            self.port = json.loads(line)["port"]
            while True:
                try:
                    if self._get("/health")["ok"]:
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except (OSError, ValueError, KeyError, TimeoutError) as exc:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"fake teacher did not start (exit code {self.process.returncode}): "
                               f"{exc!r}\n{self.log.read()}") from exc
        self.process.stdout.close()
        return self

    def _first_line(self, deadline: float) -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"no port line within {self.startup_timeout_s} s")
        line = self.process.stdout.readline()
        if not line:
            raise ValueError("the server exited before printing its port")
        return line

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop exactly this server: SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdin.close()
        if not self.process.stdout.closed:
            self.process.stdout.close()
        self.log.close()

    def __enter__(self) -> FakeTeacher:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _get(self, path: str, data: bytes | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        """The ledger: see ``GET /stats``."""
        return self._get("/stats")

    def reset(self) -> None:
        """Clear the ledger, attempt counters and rate-limit window."""
        self._get("/stats/reset", b"{}")

    def configure(self, **changes) -> FakeTeacherConfig:
        """Change knobs of the running server (e.g. ``rpm=60``); returns the new config."""
        self.config = FakeTeacherConfig(**{**dataclasses.asdict(self.config), **changes})  # validate here first
        return FakeTeacherConfig(**self._get("/config", json.dumps(changes).encode()))
