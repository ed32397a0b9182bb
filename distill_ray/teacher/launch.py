"""Start the teachers a config asks to run locally (`teachers[].launch`), for the steps that call them.

The embedded default's teacher is the offline SmolLM2 server on 127.0.0.1:8100. `distill-ray run`
(and every step that calls a teacher) starts it when nothing answers at its `base_url` yet, waits
until it is healthy, and stops exactly the processes it started when the steps are done. A teacher
already answering at that address (started by hand with `distill-ray teacher serve`) is used as it
is and left running.

The server is vLLM's own OpenAI-compatible server (`teachers[].engine.backend: vllm`, the default;
`distill_ray.engine.server`), serving the model as the teacher's `model` name, or distill-ray's own
transformers server (`backend: transformers`, `distill_ray.teacher.offline`). Each runs in a process
group of its own (vLLM has an EngineCore child process), which is stopped as a whole, and gets SIGTERM
when the launcher dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from distill_ray.config.schema import PipelineConfig, Teacher
from distill_ray.engine.server import start_process, stop_process
from distill_ray.teacher.errors import TeacherRejected

# vLLM starts in about 40 s eager and 110 s compiled on 2 idle cores; the first start on a machine also
# converts the GGUF file (about a minute), and the steps share the CPU with it.
START_TIMEOUT_S = 900


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
        """Start the teacher's server (without waiting for it); call from the main thread (see
        `start_process`)."""
        log = tempfile.NamedTemporaryFile(prefix=f"distill-ray-teacher-{teacher.name}-", suffix=".log", delete=False)  # noqa: SIM115
        backend = teacher.engine.backend
        command = [sys.executable, "-m", "distill_ray.engine.server", "--model", str(teacher.launch),
                   "--name", teacher.model, "--host", "127.0.0.1", "--port", str(_port(teacher)),
                   "--engine-json", teacher.engine.model_dump_json()] if backend == "vllm" else \
            [sys.executable, "-m", "distill_ray.teacher.offline", "--host", "127.0.0.1", "--port",
             str(_port(teacher)), "--model", str(teacher.launch), "--parent-pid", str(os.getpid())]
        if teacher.api_key_env:
            command += ["--api-key-env", teacher.api_key_env]
        what = "vLLM" if backend == "vllm" else "transformers"
        self.echo(f"teacher {teacher.name}: starting the offline teacher ({teacher.launch}, {what}) at "
                  f"{teacher.base_url}; log {log.name}")
        process = start_process(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, output=log)
        log.close()
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
            if stop_process(process):
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
