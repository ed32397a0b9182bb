"""`distill-ray submit` to a real `ray start --head` on 127.0.0.1 (cluster/local_head.py, token auth on).

The head is started with the teacher's key in its environment, as a cluster's pods get it from a
Kubernetes secret; the job must find it there, and the key must appear in nothing the Jobs API
returns. The head is stopped by the fixture (only the processes it started).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.conftest import ROOT

KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
N_ROWS = 24


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head (token auth) from cluster/local_head.py; yields the client's environment."""
    state_dir = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    assert env[KEY_ENV]  # the head, hence the job, inherits the key (tests/integration/conftest.py sets it)
    # The head gets no PYTHONPATH: its jobs import distill_ray from the working_dir `submit` uploads.
    head_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    started = _run(["cluster/local_head.py", "start", "--state-dir", str(state_dir), "--num-cpus", "2"], head_env, 180)
    env["PYTHONPATH"] = str(ROOT)  # the client runs this checkout's distill-ray (as `pip install -e .` would)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                   if line.startswith("export "))
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        yield {**env, **exports}
    finally:
        state = json.loads((state_dir / "head.json").read_text()) if (state_dir / "head.json").exists() else None
        stopped = _run(["cluster/local_head.py", "stop", "--state-dir", str(state_dir)], env, 60)
        assert stopped.returncode == 0, stopped.stderr
        if state:
            assert not Path(state["temp_dir"]).exists()
            assert not _alive(state["pid"])  # the `ray start --block` leader, hence its session


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def config_file(tmp_path):
    def write(base_url: str, **extra) -> Path:
        log = tmp_path / "log.jsonl"
        log.write_text("".join(json.dumps({"text": f"Where is order ORD-{200000 + i}? It is {i + 2} days late "
                                                   f"and item {i} was {['red', 'blue'][i % 2]}",
                                           "category": ["shipping", "refund"][i % 2]}) + "\n" for i in range(N_ROWS)))
        config = {"name": "submit-test", "workdir": str(tmp_path / "run"),
                  "prompts": {"source": str(log), "size": N_ROWS, "dedupe": "exact", "holdout_fraction": 0.2,
                              "min_per_category": 1, "holdout_min_per_category": 1},
                  "teachers": [{"name": "fake", "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                                "requests_per_minute": 60000, "max_concurrency": 8, "max_tokens": 16}],
                  "generate": {"num_workers": 1, "batch_size": 8, "progress_every_s": 1}, **extra}
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))
        return path

    return write


def _client(env: dict[str, str]):
    from ray.job_submission import JobSubmissionClient

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"})


def test_submit_prompts_and_generate_waits_streaming_logs_to_succeeded(head, config_file, tmp_path):
    secret = os.environ[KEY_ENV]
    with FakeTeacher(FakeTeacherConfig(api_key=secret)) as teacher:
        config = config_file(teacher.base_url)
        result = _run(["-m", "distill_ray", "submit", str(config), "--steps", "prompts,generate"], head)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
        lines = result.stdout.splitlines()
        submitted = next(line for line in lines if line.startswith("submitted "))
        submission_id = submitted.split()[1]
        assert submission_id.startswith("submit-test-prompts-generate-")
        assert f"in the variables the config names: {KEY_ENV}" in submitted and "(values not sent)" in submitted
        assert lines[-1] == f"job {submission_id}: SUCCEEDED (exit code 0)"
        assert "== generate done" in result.stdout  # the job's own log lines, streamed while it ran
        assert len(teacher.stats()["billed_per_prompt"]) == N_ROWS  # the job found the key on the head

    workdir = Workdir(str(tmp_path / "run"))
    assert workdir.read_json("prompts", "manifest.json")["counts"]
    answers = workdir.read_table("teacher", "answers").to_pylist()
    assert len(answers) == N_ROWS and all(row["completion"].startswith("ORD-2") for row in answers)

    info = _client(head).get_job_info(submission_id)
    assert info.status == "SUCCEEDED" and KEY_ENV in info.metadata["secret_env_names"].split(",")
    sent = json.dumps(info.runtime_env) + info.entrypoint + json.dumps(info.metadata)
    assert secret not in sent and KEY_ENV not in json.dumps(info.runtime_env.get("env_vars", {}))
    assert secret not in _client(head).get_job_logs(submission_id)
    assert secret not in result.stdout + result.stderr

    listed = _run(["-m", "distill_ray", "jobs", "list"], head)
    assert submission_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = _run(["-m", "distill_ray", "jobs", "status", submission_id], head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout


def test_bad_config_is_refused_before_anything_is_sent(head, config_file):
    before = len(_client(head).list_jobs())
    config = config_file("http://127.0.0.1:9/v1", budget_usdd=5)
    result = _run(["-m", "distill_ray", "submit", str(config), "--steps", "prompts"], head)
    assert result.returncode == 2
    assert "budget_usdd: unknown key" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr

    unknown_step = _run(["-m", "distill_ray", "submit", str(config_file("http://127.0.0.1:9/v1")),
                         "--steps", "prompts,distil"], head)
    assert unknown_step.returncode == 2 and "unknown step(s) distil" in unknown_step.stderr
    assert len(_client(head).list_jobs()) == before  # nothing reached the cluster


def test_a_failed_job_is_the_exit_code_and_no_wait_returns_at_once(head, config_file):
    """generate without prompts: the job's own verb exits 2 on the cluster (missing input)."""
    config = config_file("http://127.0.0.1:9/v1")
    waited = _run(["-m", "distill_ray", "submit", str(config), "--steps", "generate"], head)
    submission_id = next(line for line in waited.stdout.splitlines() if line.startswith("submitted ")).split()[1]
    assert waited.returncode == 2, (waited.stdout[-3000:], waited.stderr[-3000:])
    assert "distill-ray generate: " in waited.stdout  # the job's error, from its streamed log
    assert waited.stdout.splitlines()[-1].startswith(f"job {submission_id}: FAILED (exit code 2)")

    started = time.monotonic()
    detached = _run(["-m", "distill_ray", "submit", str(config), "--steps", "generate", "--no-wait"], head)
    assert detached.returncode == 0, detached.stderr[-3000:]
    submission_id = next(line for line in detached.stdout.splitlines() if line.startswith("submitted ")).split()[1]
    assert detached.stdout.splitlines()[-1] == f"follow it with: distill-ray jobs logs {submission_id} --follow"
    assert "distill-ray generate: " not in detached.stdout and time.monotonic() - started < 60
    followed = _run(["-m", "distill_ray", "jobs", "logs", submission_id, "--follow"], head)
    assert followed.returncode == 2 and "distill-ray generate: " in followed.stdout
    assert followed.stdout.splitlines()[-1].startswith(f"job {submission_id}: FAILED (exit code 2)")


def test_missing_token_is_explained(head, config_file, tmp_path):
    env = {k: v for k, v in head.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    result = _run(["-m", "distill_ray", "jobs", "list"], env)
    assert result.returncode == 2
    assert "requires a Ray auth token" in result.stderr and "RAY_AUTH_TOKEN_PATH" in result.stderr
    assert "Traceback" not in result.stderr
