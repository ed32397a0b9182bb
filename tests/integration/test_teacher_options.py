"""Hosted teachers as they are today, through `distill-ray generate` on the scripted fake teacher:
a reasoning model that refuses `max_tokens`, Azure OpenAI's URL and key header, request options, and
cached and reasoning tokens in the bill."""

from __future__ import annotations

import json
import os

import pytest

from distill_ray.cli import main
from distill_ray.config.schema import Teacher
from distill_ray.teacher.client import cost_usd
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.helpers.steps import KEY_ENV, N_PROMPTS
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers
from tests.helpers.steps import teacher_config_file as _config_file

pytestmark = pytest.mark.usefixtures("ray_local")


def _with_instructions(path):
    """A system prompt every request shares: the provider's prompt cache serves it after the first."""
    config = json.loads(path.read_text())
    config["task"] = {"instructions": "Reply with the order number in the message, or NONE."}
    path.write_text(json.dumps(config))
    return path


def test_reasoning_teacher_refusing_max_tokens_stops_after_one_request(prompt_set, tmp_path, capsys):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], unsupported_params=["max_tokens"], reasoning_tokens=6,
                             cached_prompt_tokens=4)
    with FakeTeacher(fake) as teacher:
        config = _config_file(tmp_path, workdir, teacher.base_url, max_tokens=32)
        assert main(["generate", str(config)]) == 2
        err = capsys.readouterr().err
        assert teacher.stats()["requests"] == 1  # the preflight, and nothing after it
        assert "Unsupported parameter: 'max_tokens'" in err  # the API's own words
        assert "token_limit_param: max_completion_tokens" in err  # and what to change
        assert not (workdir / "teacher" / "answers").exists()

        teacher.reset()
        config = _config_file(tmp_path, workdir, teacher.base_url, max_tokens=32,
                              token_limit_param="max_completion_tokens", reasoning_effort="low",
                              extra_body={"service_tier": "flex"}, extra_headers={"X-Team": "distill"})
        _with_instructions(config)
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
        assert set(stats["billed_per_prompt"].values()) == {1} and len(stats["billed_per_prompt"]) == N_PROMPTS
        assert {"max_completion_tokens", "reasoning_effort", "service_tier"} <= set(stats["last_request_keys"])
        assert "max_tokens" not in stats["last_request_keys"]
        assert stats["last_request_headers"].get("x-team") == "distill"

    rows = _answers(workdir)
    assert all(r["reasoning_tokens"] == 6 and r["completion_tokens"] > 6 for r in rows)
    assert sum(r["cached_tokens"] for r in rows) > 0  # the shared system prompt, cached after the first request
    teacher_cfg = Teacher.model_validate(json.loads(config.read_text())["teachers"][0])
    for row in rows:  # reasoning tokens are billed as output; cached prompt tokens at their own price
        assert row["cost_usd"] == pytest.approx(cost_usd(teacher_cfg, row["prompt_tokens"], row["completion_tokens"],
                                                         row["cached_tokens"]))
    billed = (stats["prompt_tokens"] * 1000.0 + stats["completion_tokens"] * 2000.0) / 1e6
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(billed)  # what we book is what the provider bills


def test_cached_prompt_tokens_have_their_own_price(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], cached_prompt_tokens=3)) as teacher:
        config = _with_instructions(_config_file(tmp_path, workdir, teacher.base_url,
                                                 price_per_1m_cached_input_tokens=100.0))
        assert main(["generate", str(config)]) == 0
    rows = _answers(workdir)
    cached = [r for r in rows if r["cached_tokens"]]
    assert cached
    for r in cached:
        full = (r["prompt_tokens"] * 1000.0 + r["completion_tokens"] * 2000.0) / 1e6
        assert r["cost_usd"] == pytest.approx(full - r["cached_tokens"] * (1000.0 - 100.0) / 1e6)


def test_azure_openai_deployment_url_api_version_and_key_header(prompt_set, tmp_path):  # noqa: F811
    workdir = _workdir(prompt_set, tmp_path)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as teacher:
        config = _config_file(tmp_path, workdir, teacher.url, api="azure", api_version="2024-10-21",
                              model="my-gpt-deployment")
        assert main(["generate", str(config)]) == 0
        stats = teacher.stats()
    assert stats["by_kind"]["azure"] == N_PROMPTS and set(stats["billed_per_prompt"].values()) == {1}
    assert stats["last_request_headers"].get("api-key") == "***"  # the key went in Azure's header
    rows = _answers(workdir)
    assert len(rows) == N_PROMPTS and not [r for r in rows if r["error"]]


def test_azure_without_api_version_is_refused_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"name": "x", "workdir": str(tmp_path / "run"), "teachers": [
        {"name": "az", "base_url": "https://example.openai.azure.com", "model": "dep", "api": "azure"}]}))
    assert main(["generate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "api_version" in err and "teachers" in err
