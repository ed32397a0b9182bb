"""`teachers[].launch`: the step starts the offline teacher, uses it, and stops exactly it.

The launched model is a tiny in-process Llama saved to a folder (its answers are nonsense; what is
checked is the life cycle: started, answering every prompt, stopped, never orphaned).
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
from distill_ray.teacher.launch import is_up
from tests.conftest import ROOT
from tests.integration.test_generate import _answers, _workdir, prompt_set  # noqa: F401 - fixture
from tests.integration.test_offline_teacher import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("ray_local")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(tmp_path, workdir, folder, port: int):
    teacher = {"name": "local", "base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny", "launch": str(folder),
               "max_tokens": 4, "max_concurrency": 8, "requests_per_minute": 60000}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"name": "launch-test", "workdir": str(workdir), "teachers": [teacher],
                                "generate": {"num_workers": 1, "batch_size": 8, "progress_every_s": 5}}))
    return path


def test_generate_starts_the_teacher_then_stops_it(prompt_set, tiny_folder, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    port = _free_port()
    path = _config(tmp_path, workdir, tiny_folder, port)
    teacher = load_config(str(path)).teachers[0]
    assert main(["generate", str(path)]) == 0
    rows = _answers(workdir)
    assert rows and not [r for r in rows if r["error"]]  # every prompt answered by the launched teacher
    out = capsys.readouterr().out
    assert "starting the offline teacher" in out and "stopped" in out
    assert not is_up(teacher)  # nothing left listening


def test_a_launched_teacher_does_not_outlive_a_killed_launcher(tiny_folder, tmp_path):
    port = _free_port()
    path = _config(tmp_path, tmp_path / "run", tiny_folder, port)
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
        launcher.send_signal(signal.SIGKILL)  # no chance to clean up
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 15
        while is_up(teacher) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not is_up(teacher)  # the teacher noticed and stopped itself
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stdout.close()
