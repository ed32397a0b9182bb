"""`distill-ray generate` with `generate.mode: batch`: the teacher's Files + Batches API, on the fake teacher.

What these tests count is what a user pays for (the fake's ledger of billed lines) and what they get
(the answers table): every prompt answered and billed once, at the batch price, across kills and reruns.
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
from distill_ray.config.schema import Teacher
from distill_ray.storage import Workdir
from distill_ray.teacher.batch import state_path
from distill_ray.teacher.cache import AnswerCache
from distill_ray.teacher.client import cost_usd
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.conftest import ROOT
from tests.helpers.steps import KEY_ENV, N_PROMPTS
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers
from tests.helpers.steps import teacher_config_file as _config_file

pytestmark = pytest.mark.usefixtures("ray_local")


def _batch_config(tmp_path, workdir, base_url, budget_usd=None, **generate):
    path = _config_file(tmp_path, workdir, base_url)
    config = json.loads(path.read_text())
    config["generate"].update({"mode": "batch", "batch_poll_s": 0.2, "progress_every_s": 1, **generate})
    if budget_usd is not None:
        config["budget_usd"] = budget_usd
    path.write_text(json.dumps(config))
    return path, Teacher.model_validate(config["teachers"][0])


def _state(workdir) -> dict:
    return Workdir(str(workdir)).read_json(*state_path("fake"))


def _chunks(workdir) -> list[dict]:
    """The state file's chunks, [] before it is written (the driver writes it whole, by rename)."""
    return (_state(workdir) or {}).get("chunks", [])


def _order_numbers_after_the_first(workdir, count: int) -> list[str]:
    """Order numbers of prompts that are not the first one asked (the live preflight request)."""
    train = Workdir(str(workdir)).read_table("prompts", "train").to_pylist()
    return [row["messages"][-1]["content"].split()[3] for row in train[1:1 + count]]


def test_batch_answers_every_prompt_once_at_the_batch_price(prompt_set, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=1.0)) as teacher:
        config, teacher_cfg = _batch_config(tmp_path, workdir, teacher.base_url)
        assert main(["generate", str(config)]) == 0
        rows = _answers(workdir)
        assert len(rows) == N_PROMPTS and not [r for r in rows if r["error"]]
        for row in rows:
            assert row["completion"] == row["messages"][-1]["content"].split()[3].upper()
        stats = teacher.stats()
        assert stats["batches_created"] == 1 and stats["batch_lines_billed"] == N_PROMPTS - 1
        assert stats["batches"][0]["status"] == "completed" and stats["batches"][0]["total"] == N_PROMPTS - 1
        assert stats["requests"] == 1  # the one live preflight request
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}

        # Each answer is priced from the fake's own token counts: half the online price in the batch,
        # the online price for the preflight.
        cached = AnswerCache(Workdir(str(workdir)), "fake").load()
        assert sorted(a["node"] for a in cached.values()).count("batch") == N_PROMPTS - 1
        assert [a["node"] for a in cached.values() if a["node"] != "batch"] == ["driver"]
        assert sum(a["prompt_tokens"] for a in cached.values()) == stats["prompt_tokens"]
        assert sum(a["completion_tokens"] for a in cached.values()) == stats["completion_tokens"]
        for answer in cached.values():
            online = cost_usd(teacher_cfg, answer["prompt_tokens"], answer["completion_tokens"])
            expected = online / 2 if answer["node"] == "batch" else online
            assert answer["cost_usd"] == pytest.approx(expected) and expected > 0
        report = Workdir(str(workdir)).read_json("teacher", "report.json")
        total = sum(a["cost_usd"] for a in cached.values())
        assert report["spent_usd_total"] == pytest.approx(total, abs=1e-6)
        batch = report["teachers"]["fake"]["batch"]
        assert (batch["submitted"], batch["resumed"], batch["answered"], batch["failed"]) == (1, 0, N_PROMPTS - 1, 0)
        assert batch["batches"] == [stats["batches"][0]["id"]]
        assert batch["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in cached.values() if a["node"] == "batch"))
        state = _state(workdir)
        assert [(c["batch_id"], c["processed"], c["status"]) for c in state["chunks"]] == \
            [(stats["batches"][0]["id"], True, "completed")]
        out = capsys.readouterr().out
        assert f"batch {stats['batches'][0]['id']} submitted ({N_PROMPTS - 1} requests" in out

        # Done: a rerun asks nothing, live or batched.
        Workdir(str(workdir)).remove("teacher", "manifest.json")
        assert main(["generate", str(config)]) == 0
        after = teacher.stats()
        assert (after["requests"], after["batches_created"]) == (1, 1)


def test_killed_while_polling_resumes_the_same_batch(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=6.0)) as teacher:
        config, _ = _batch_config(tmp_path, workdir, teacher.base_url)
        process = subprocess.Popen([sys.executable, "-m", "distill_ray", "generate", str(config)], cwd=ROOT, env=env,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        try:
            while True:
                stats = teacher.stats()
                # Polling: the provider runs the batch and the driver has recorded its id.
                if stats["batches_created"] == 1 and stats["batches"][0]["status"] == "in_progress" \
                        and [c.get("batch_id") for c in _chunks(workdir)] == [stats["batches"][0]["id"]]:
                    break
                assert process.poll() is None and time.monotonic() < deadline, "generate ended before the kill"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, nothing else
            process.wait()
        batch_id = stats["batches"][0]["id"]
        state = _state(workdir)  # the batch was recorded before the driver started polling it
        assert [(c["batch_id"], c["processed"]) for c in state["chunks"]] == [(batch_id, False)]
        assert len(state["chunks"][0]["keys"]) == N_PROMPTS - 1

        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert stats["batches_created"] == 1 and stats["batches"][0]["status"] == "completed"
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
        rows = _answers(workdir)
        assert len(rows) == N_PROMPTS and not [r for r in rows if r["error"]]
        batch = Workdir(str(workdir)).read_json("teacher", "report.json")["teachers"]["fake"]["batch"]
        assert (batch["submitted"], batch["resumed"], batch["batches"]) == (0, 1, [batch_id])


def test_batch_max_requests_splits_the_work(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    # The fake refuses a batch over its limits (validation fails): every batch completing proves each fits.
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=0.5, batch_max_requests=10)
    with FakeTeacher(fake) as teacher:
        config, _ = _batch_config(tmp_path, workdir, teacher.base_url, batch_max_requests=10)
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert [(b["status"], b["total"]) for b in stats["batches"]] == [("completed", 10)] * 3 + [("completed", 9)]
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
        assert len(_answers(workdir)) == N_PROMPTS


def test_batch_max_bytes_splits_the_work(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=0.5, batch_max_bytes=2048)
    with FakeTeacher(fake) as teacher:
        config, _ = _batch_config(tmp_path, workdir, teacher.base_url, batch_max_bytes=2048)
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert len(stats["batches"]) > 5 and {b["status"] for b in stats["batches"]} == {"completed"}
        assert sum(b["total"] for b in stats["batches"]) == N_PROMPTS - 1
        assert all(c["bytes"] <= 2048 for c in _state(workdir)["chunks"])
        assert len(_answers(workdir)) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}


def test_a_failed_line_is_that_rows_error_and_asked_again(prompt_set, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    refused, flaky = _order_numbers_after_the_first(workdir, 2)
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=0.5,
                             faults={refused: ["400"], flaky: ["500"]})
    with FakeTeacher(fake) as teacher:
        config, _ = _batch_config(tmp_path, workdir, teacher.base_url)
        assert main(["generate", str(config)]) == 0
        rows = _answers(workdir)
        failed = {r["messages"][-1]["content"].split()[3]: r for r in rows if r["error"]}
        assert sorted(failed) == sorted([refused, flaky])
        assert (failed[refused]["error_kind"], failed[refused]["error"]) == ("400", "HTTP 400: Invalid request "
                                                                             "(scripted fault).")
        assert failed[flaky]["error_kind"] == "500" and failed[flaky]["error"].startswith("HTTP 500: ")
        manifest = Workdir(str(workdir)).read_json("teacher", "manifest.json")
        assert manifest["status"] == "partial" and manifest["counts"]["errors_by_kind"] == {"400": 1, "500": 1}
        assert "asked again on the next run" in capsys.readouterr().out
        assert len(teacher.stats()["billed_per_prompt"]) == N_PROMPTS - 2  # failed lines are not billed

        # The rerun asks only for those two: one as the live preflight, the other in a new batch of one.
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert [b["total"] for b in stats["batches"]] == [N_PROMPTS - 1, 1]
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
        assert not [r for r in _answers(workdir) if r["error"]]


def test_budget_submits_only_what_fits(prompt_set, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=0.5)) as teacher:
        # At these prices a line is estimated at about $0.03 at the batch price: about 15 of the 39 fit.
        config, _ = _batch_config(tmp_path, workdir, teacher.base_url, budget_usd=0.5)
        assert main(["generate", str(config)]) == 1
        assert "budget_usd=0.5" in capsys.readouterr().err
        stats = teacher.stats()
        sent = stats["batches"][0]["total"]
        assert stats["batches_created"] == 1 and 0 < sent < N_PROMPTS - 1
        report = Workdir(str(workdir)).read_json("teacher", "report.json")
        assert report["spent_usd_total"] <= 0.5
        assert report["errors_by_kind"] == {"budget": N_PROMPTS - 1 - sent}


def test_azure_batches_on_azure_routes(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], batch_latency_s=0.5)) as teacher:
        # Azure's resource endpoint (no /v1): files and batches under /openai/..., lines naming /chat/completions.
        config, _ = _batch_config(tmp_path, workdir, teacher.url)
        text = json.loads(config.read_text())
        text["teachers"][0].update(api="azure", api_version="2024-10-21", model="my-deployment")
        config.write_text(json.dumps(text))
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert stats["by_kind"]["azure"] == 1  # the preflight, on the deployment's chat route
        assert [(b["status"], b["total"]) for b in stats["batches"]] == [("completed", N_PROMPTS - 1)]
        assert len(stats["billed_per_prompt"]) == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
        assert {r["model"] for r in _answers(workdir)} == {"my-deployment"}
