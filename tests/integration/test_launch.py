"""`teachers[].launch`: the step starts the offline teacher, uses it, and stops exactly it.

The launched teacher is vLLM's OpenAI server (the default `engine.backend`) on a tiny Llama saved to a
folder (its answers are nonsense; what is checked is the life cycle: started, answering every prompt,
stopped with its EngineCore process, never orphaned). Each test starts one (about 40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from distill_ray.cli import main
from distill_ray.config import load_config
from distill_ray.engine.server import group_members
from distill_ray.teacher.launch import is_up
from tests.conftest import ROOT
from tests.helpers.models import save_tiny_vllm_folder
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers

pytestmark = pytest.mark.usefixtures("ray_local")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_vllm_folder(tmp_path_factory.mktemp("tiny-teacher"))


def _config(tmp_path, workdir, folder, port: int, backend: str = "vllm"):
    teacher = {"name": "local", "base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny", "launch": str(folder),
               "max_tokens": 4, "max_concurrency": 8, "requests_per_minute": 60000, "engine": {"backend": backend}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"name": "launch-test", "workdir": str(workdir), "teachers": [teacher],
                                "generate": {"num_workers": 1, "batch_size": 8, "progress_every_s": 5}}))
    return path


# vLLM's variant is a vLLM start of its own (40 s): slow; test_offline_teacher starts vLLM's server in the
# default suite, and the launch, the wait and the stop are the same for both.
@pytest.mark.parametrize("backend", [pytest.param("vllm", marks=pytest.mark.slow), "transformers"])
def test_generate_starts_the_teacher_then_stops_it(backend, prompt_set, tiny_folder, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    port = _free_port()
    path = _config(tmp_path, workdir, tiny_folder, port, backend)
    teacher = load_config(str(path)).teachers[0]
    assert main(["generate", str(path)]) == 0
    rows = _answers(workdir)
    assert rows and not [r for r in rows if r["error"]]  # every prompt answered by the launched teacher
    out = capsys.readouterr().out
    assert "starting the offline teacher" in out and "stopped" in out
    assert (", vLLM)" in out) == (backend == "vllm")
    assert not is_up(teacher)  # nothing left listening
    pid = int(out.split("(pid ")[1].split(")")[0])
    assert not group_members(pid)  # the server (and vLLM's EngineCore process) are gone


# vLLM's variant is a vLLM start of its own (29 s): slow; the launcher's kill handling is the same for both.
@pytest.mark.parametrize("backend", [pytest.param("vllm", marks=pytest.mark.slow), "transformers"])
def test_a_launched_teacher_does_not_outlive_a_killed_launcher(backend, tiny_folder, tmp_path):
    port = _free_port()
    path = _config(tmp_path, tmp_path / "run", tiny_folder, port, backend)
    script = ("import sys, time\nfrom distill_ray.config import load_config\n"
              "from distill_ray.teacher.launch import launched_teachers\n"
              f"with launched_teachers(load_config({str(path)!r})) as launched:\n"
              "    launched.wait()\n    print('READY', flush=True)\n    time.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    teacher = load_config(str(path)).teachers[0]
    try:
        lines = []
        while not lines or lines[-1].strip() != "READY":
            line = launcher.stdout.readline()
            assert line, "the launcher exited before the teacher served:\n" + "".join(lines)
            lines.append(line)
        assert is_up(teacher)
        pid = int("".join(lines).split("(pid ")[1].split(")")[0])
        assert len(group_members(pid)) >= (2 if backend == "vllm" else 1)  # vLLM's server and its EngineCore
        launcher.send_signal(signal.SIGKILL)  # no chance to clean up
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (is_up(teacher) or group_members(pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not is_up(teacher)  # the teacher got SIGTERM when its launcher died, and stopped
        assert not group_members(pid)  # with every process it started
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stdout.close()
