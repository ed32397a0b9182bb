"""Start the teachers a config asks to run locally (`teachers[].launch`), for the steps that call them.

The embedded default's teacher is the offline SmolLM2 server on 127.0.0.1:8100. `distill-ray run`
(and every step that calls a teacher) starts it when nothing answers at its `base_url` yet, waits
until it is healthy, and stops exactly the process it started when the steps are done. A teacher
already answering at that address (started by hand with `distill-ray teacher serve`) is used as it
is and left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from distill_ray.config.schema import PipelineConfig, Teacher
from distill_ray.teacher.errors import TeacherRejected

START_TIMEOUT_S = 600  # the first start on a machine converts the GGUF file (about a minute here)


def _health_url(teacher: Teacher) -> str:
    parts = urlsplit(teacher.base_url)
    return f"{parts.scheme}://{parts.netloc}/health"


def is_up(teacher: Teacher, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(_health_url(teacher), timeout=timeout_s) as response:  # noqa: S310 - config URL
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port(teacher: Teacher) -> int:
    parts = urlsplit(teacher.base_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise TeacherRejected(f"teachers.{teacher.name}.launch: a launched teacher listens on 127.0.0.1, but base_url "
                              f"is {teacher.base_url}")
    return parts.port or 80


class Launched:
    """The teachers started for a run; `wait()` blocks until all of them serve."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.processes: list[tuple[Teacher, subprocess.Popen, str]] = []
        self.ready = False

    def start(self, teacher: Teacher) -> None:
        log = tempfile.NamedTemporaryFile(prefix=f"distill-ray-teacher-{teacher.name}-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "distill_ray.teacher.offline", "--host", "127.0.0.1", "--port",
                   str(_port(teacher)), "--model", str(teacher.launch), "--parent-pid", str(os.getpid())]
        self.echo(f"teacher {teacher.name}: starting the offline teacher ({teacher.launch}) at {teacher.base_url}; "
                  f"log {log.name}")
        # Its own session: a Ctrl-C in this terminal reaches us, and we stop it in order.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.processes.append((teacher, process, log.name))

    def wait(self) -> None:
        if self.ready:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        for teacher, process, log in self.processes:
            while not is_up(teacher):
                if process.poll() is not None:
                    with open(log, encoding="utf-8", errors="replace") as f:
                        tail = f.read()[-2000:]
                    raise TeacherRejected(f"teachers.{teacher.name}.launch: the offline teacher exited with code "
                                          f"{process.returncode} before serving:\n{tail}")
                if time.monotonic() > deadline:
                    raise TeacherRejected(f"teachers.{teacher.name}.launch: not serving after {START_TIMEOUT_S}s "
                                          f"(log: {log})")
                time.sleep(0.5)
            self.echo(f"teacher {teacher.name}: serving at {teacher.base_url} (pid {process.pid})")
        self.ready = True

    def stop(self) -> None:
        for teacher, process, log in self.processes:
            if _stop(process):
                self.echo(f"teacher {teacher.name}: stopped (log: {log})")
        self.processes = []


@contextlib.contextmanager
def launched_teachers(config: PipelineConfig, echo: Callable[[str], None] = print) -> Iterator[Launched]:
    """Start every `launch` teacher that is not already answering (without waiting: the model loads
    while earlier steps run; call `wait()` before a step that calls a teacher), and stop exactly
    those afterwards."""
    launched = Launched(echo)
    try:
        for teacher in config.teachers:
            if teacher.launch is None:
                continue
            if is_up(teacher):
                echo(f"teacher {teacher.name}: already serving at {teacher.base_url}; using it")
                continue
            launched.start(teacher)
        yield launched
    finally:
        launched.stop()


def _stop(process: subprocess.Popen) -> bool:
    """Stop a process we started; False when it had already exited."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return True
