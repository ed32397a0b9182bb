"""`distill-ray generate` against a scripted fake teacher (real HTTP on 127.0.0.1, its own process).

What a user pays for is what these tests count: the fake teacher's ledger of billed answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distill_ray.cli import main
from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.conftest import ROOT
from tests.helpers.steps import KEY_ENV, N_PROMPTS
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers
from tests.helpers.steps import teacher_config_file as _config_file

pytestmark = pytest.mark.usefixtures("ray_local")


def test_fault_mix_loses_no_row_and_pays_once(prompt_set, tmp_path, capsys):
    faults = {"ORD-100001": ["500", "503", "ok"], "ORD-100002": ["malformed", "truncated", "ok"],
              "ORD-100003": ["reset", "ok"], "ORD-100004": ["timeout", "ok"], "ORD-100005": ["429", "ok"],
              "ORD-100006": ["empty_choices", "408", "ok"], "ORD-100007": ["500"] * 20}
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], faults=faults)) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url)
        assert main(["generate", str(config)]) == 0
        rows = _answers(workdir)
        assert len(rows) == N_PROMPTS  # every prompt has its row, answered or not
        failed = [r for r in rows if r["error"]]
        assert [(r["error_kind"], "ORD-100007" in r["messages"][-1]["content"]) for r in failed] == [("500", True)]
        assert failed[0]["attempts"] == 7 and "gave up after 7 attempts" in failed[0]["error"]
        for row in rows:
            if not row["error"]:
                assert row["completion"] == row["messages"][-1]["content"].split()[3].upper()
                assert row["mean_logprob"] is not None and row["prompt_tokens"] > 0 and row["cost_usd"] > 0
        stats = teacher.stats()
        assert set(stats["billed_per_prompt"].values()) == {1} and len(stats["billed_per_prompt"]) == N_PROMPTS - 1
        manifest = Workdir(str(workdir)).read_json("teacher", "manifest.json")
        assert manifest["status"] == "partial" and manifest["counts"]["errors_by_kind"] == {"500": 1}
        out = capsys.readouterr().out
        assert "asked again on the next run" in out

        # The teacher recovers: a rerun asks only for the failed row, and everything is paid once.
        teacher.configure(faults={})
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
        assert Workdir(str(workdir)).read_json("teacher", "manifest.json")["status"] == "complete"

        # A rerun after completion makes zero calls, even with the manifest gone (the cache remembers).
        before = teacher.stats()["requests"]
        assert main(["generate", str(config)]) == 0
        Workdir(str(workdir)).remove("teacher", "manifest.json")
        assert main(["generate", str(config)]) == 0
        assert teacher.stats()["requests"] == before
        assert len(_answers(workdir)) == N_PROMPTS


def test_bad_key_stops_at_once_and_no_key_leaks(prompt_set, tmp_path, capsys):
    workdir = _workdir(prompt_set, tmp_path)
    secret = os.environ[KEY_ENV]
    with FakeTeacher(FakeTeacherConfig(api_key="sk-the-right-one")) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url)
        assert main(["generate", str(config)]) == 2
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "api_key_env" in err
        assert teacher.stats()["requests"] == 1  # the driver's single preflight request
    with FakeTeacher(FakeTeacherConfig(api_key=secret)) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url)
        assert main(["generate", str(config)]) == 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for path in workdir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_budget_stops_cleanly_and_resumes_without_paying_twice(prompt_set, tmp_path, capsys):
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url)
        text = json.loads(config.read_text())
        text["budget_usd"] = 0.5  # each answer costs about $0.03 at these prices: about 15 of the 40
        config.write_text(json.dumps(text))
        assert main(["generate", str(config)]) == 1
        err = capsys.readouterr().err
        assert "budget_usd=0.5" in err and "run again to resume" in err
        report = Workdir(str(workdir)).read_json("teacher", "report.json")
        assert report["spent_usd_total"] <= 0.5 and report["errors_by_kind"]["budget"] > 0
        billed_first = len(teacher.stats()["billed_per_prompt"])
        assert 0 < billed_first < N_PROMPTS

        text["budget_usd"] = 100.0
        config.write_text(json.dumps(text))
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}


def test_sigkill_half_way_then_rerun_pays_each_prompt_once(prompt_set, tmp_path):
    workdir = _workdir(prompt_set, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Like a real provider, the fake bills answers whose client died before reading them, and bills
    # every request (an Idempotency-Key buys nothing): only what was in flight at the kill may be paid twice.
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], latency_s=0.25, bill_abandoned=True,
                             honour_idempotency_key=False)
    with FakeTeacher(fake) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url, max_concurrency=4)
        command = [sys.executable, "-m", "distill_ray", "generate", str(config)]
        process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        try:
            while teacher.stats()["answered"] < N_PROMPTS // 2:
                assert process.poll() is None and time.monotonic() < deadline, "generate ended before the kill"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, nothing else
            process.wait()
        paid_before = teacher.stats()["answered"]
        assert paid_before < N_PROMPTS
        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        stats = teacher.stats()
        assert len(stats["billed_per_prompt"]) == N_PROMPTS
        twice = [key for key, count in stats["billed_per_prompt"].items() if count > 1]
        abandoned = stats["by_kind"].get("abandoned", 0)
        print(f"in flight at the kill: {abandoned}; of those asked again on the rerun: {len(twice)}")
        assert set(stats["billed_per_prompt"].values()) <= {1, 2}
        assert len(twice) <= abandoned <= 4  # only the requests in flight at the kill (max_concurrency 4)
        assert len(_answers(workdir)) == N_PROMPTS


def test_every_prompt_to_every_teacher_within_each_ones_limits(prompt_set, tmp_path):
    """Two teachers: each gets every prompt; one's max_concurrency and the other's requests/min hold
    across both workers (the limiter is one actor per teacher, not per worker)."""
    workdir = _workdir(prompt_set, tmp_path)
    key = os.environ[KEY_ENV]
    with FakeTeacher(FakeTeacherConfig(api_key=key, latency_s=0.2)) as slow, \
         FakeTeacher(FakeTeacherConfig(api_key=key, rpm=600)) as limited:
        path = _config_file(tmp_path, workdir, slow.base_url, name="slow", max_concurrency=3)
        config = json.loads(path.read_text())
        config["teachers"].append({**config["teachers"][0], "name": "limited", "base_url": limited.base_url,
                                   "requests_per_minute": 600, "max_concurrency": 64})
        path.write_text(json.dumps(config))
        assert main(["generate", str(path)]) == 0

        rows = _answers(workdir)
        assert len(rows) == 2 * N_PROMPTS and not [r for r in rows if r["error"]]
        by_teacher = {name: sorted(r["id"] for r in rows if r["teacher"] == name) for name in ("slow", "limited")}
        assert by_teacher["slow"] == by_teacher["limited"] and len(set(by_teacher["slow"])) == N_PROMPTS

        slow_stats, limited_stats = slow.stats(), limited.stats()
        assert 2 <= slow_stats["max_in_flight"] <= 3  # concurrent, yet never above the shared cap
        stamps = sorted(limited_stats["answered_timestamps"])
        # 600/min = 10/s from an empty bucket: 40 answers cannot come faster than about 4 s.
        assert stamps[-1] - stamps[0] >= (N_PROMPTS - 1) / 10 * 0.85
        assert limited_stats["by_kind"].get("rate_limited", 0) == 0
