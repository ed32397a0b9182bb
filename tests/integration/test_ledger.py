"""The teacher's ledger on a real local Ray: leases die with their holder, an answer is never asked
for twice within a run, the tokens-per-minute bucket binds, and a run that makes no progress exits 1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from distill_ray.cli import main
from distill_ray.config.schema import Teacher
from distill_ray.storage import Workdir
from distill_ray.teacher.ledger import LeaseClient, open_ledger, read_spend
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.conftest import ROOT
from tests.helpers.steps import KEY_ENV, N_PROMPTS
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers
from tests.helpers.steps import teacher_config_file as _config_file

pytestmark = pytest.mark.usefixtures("ray_local")


@ray.remote(num_cpus=0)
class Holder:
    """A stand-in generate worker: takes leases and claims keys, then is killed holding them."""

    def __init__(self, ledger):
        self.leases = LeaseClient(ledger, 8, holder=f"worker:{ray.get_runtime_context().get_actor_id()}",
                                  step="generate", ttl_s=1.0)

    async def take(self, n: int, keys: list[str]) -> dict:
        claim = await self.leases.claim(keys)
        granted = [await self.leases.acquire(10, 0.25) for _ in range(n)]
        return {"claim": claim, "granted": sum(granted)}


def test_a_dead_holders_slots_dollars_and_keys_come_back(tmp_path):
    workdir = Workdir(str(tmp_path / "run"))
    teacher = Teacher(name="t", base_url="http://127.0.0.1:9/v1", model="m", max_concurrency=2,
                      requests_per_minute=60_000)
    ledger = open_ledger(teacher, workdir, budget_usd=1.0, lease_ttl_s=1.0)
    ray.get(ledger.begin_run.remote())
    holder = Holder.remote(ledger)
    taken = ray.get(holder.take.remote(2, ["k1", "k2"]))
    assert taken == {"claim": {"send": ["k1", "k2"], "answered": [], "busy": [], "recheck": []}, "granted": 2}
    state = ray.get(ledger.state.remote())
    assert state["in_flight"] == 2 and state["reserved_usd"] == pytest.approx(0.5)

    async def other() -> tuple[dict, float, bool]:
        leases = LeaseClient(ledger, 1, holder="driver:test", step="generate", ttl_s=1.0)
        busy = await leases.claim(["k1"])  # the holder is alive: wait for its outcome
        ray.kill(holder)  # dies holding both slots, $0.50 reserved, and two claimed keys
        start = time.monotonic()
        got = await leases.acquire(10, 0.25)  # all slots are held: this waits for the dead holder's expiry
        waited = time.monotonic() - start
        again = await leases.claim(["k1", "k2"])
        leases.settle(10, 10, 0.25, 0.2, True)
        leases.done("k1", True)
        leases.close()
        return busy, again, waited, got

    busy, again, waited, got = asyncio.run(other())
    assert busy["busy"] == ["k1"]
    assert got and 0.5 <= waited < 10
    assert again["send"] == ["k1", "k2"] and again["recheck"] == ["k1", "k2"]  # orphaned: look in the cache first
    time.sleep(0.2)
    state = ray.get(ledger.persist.remote())
    assert state["expired_holders"] == 1 and state["expired_slots"] == 2
    assert state["in_flight"] == 0 and state["reserved_usd"] == pytest.approx(0.0)
    assert state["spent_usd"] == pytest.approx(0.2) and state["reclaimed"] == 1
    assert read_spend(workdir, "t")["by_step"]["generate"]["spent_usd"] == pytest.approx(0.2)  # persisted
    again = ray.get(ledger.claim.remote("driver:other", ["k1"]))
    assert again["answered"] == ["k1"]  # answered in this run: never sent again


def test_tokens_per_minute_binds_without_429s(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    tpm = 24_000  # about 30 tokens an answer: 40 answers need about 3 s of this bucket
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], tpm=tpm)) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url, tokens_per_minute=tpm, max_tokens=8,
                              max_concurrency=32)
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
    assert stats["by_kind"].get("rate_limited", 0) <= 0.02 * stats["requests"]
    stamps = sorted(stats["answered_timestamps"])[1:]  # after the driver's preflight answer
    tokens = stats["prompt_tokens"] + stats["completion_tokens"]
    # From an empty bucket, the workers' answers cannot come faster than the token rate allows.
    assert stamps[-1] - stamps[0] >= (tokens * (N_PROMPTS - 2) / N_PROMPTS - tpm / 60) / (tpm / 60) * 0.8
    assert len(_answers(workdir)) == N_PROMPTS


def test_no_progress_exits_1_instead_of_hanging(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url, timeout_s=120, max_retries=0)
        text = json.loads(config.read_text())
        text["generate"]["stall_timeout_s"] = 6
        config.write_text(json.dumps(text))
        teacher.configure(latency_s=0.5)
        process = subprocess.Popen([sys.executable, "-m", "distill_ray", "generate", str(config)], cwd=ROOT, env=env,
                                   start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while teacher.stats()["answered"] < 1:  # the preflight answered: now the teacher stops answering
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            teacher.configure(latency_s=600)
            out, err = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 1, err[-2000:]
    assert "no answer and no row ended for" in err and "run again to resume" in err
