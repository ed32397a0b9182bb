"""`distill-ray submit` before anything is sent: the job it builds, and what it refuses (no cluster needed)."""

from __future__ import annotations

import json
import shlex

import pytest

from distill_ray.cli import main
from distill_ray.config import load_config
from distill_ray.steps import STEPS, Step, one_gpu_if_use_gpu
from distill_ray.submit.client import exit_code
from distill_ray.submit.job import SubmitOptions, plan, refuse_if_secrets_sent, stage
from tests.conftest import ROOT

ADDRESS = "http://127.0.0.1:1"  # never contacted: every case here stops before connecting


@pytest.fixture
def config(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"text": "where is ORD-123456", "category": "shipping"}) + "\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"name": "unit-run", "workdir": str(tmp_path / "run"), "prompts": {"source": str(log)},
                                "teachers": [{"name": "t", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                              "api_key_env": "UNIT_TEACHER_KEY"}]}))
    return path


def test_every_registered_step_has_its_job_entry_point():
    for step in STEPS.values():
        text = (ROOT / step.script).read_text()
        assert f'main(["{step.name}", *sys.argv[1:]])' in text, step.script
    assert 'main(["run", *sys.argv[1:]])' in (ROOT / "jobs/run.py").read_text()


def test_one_step_runs_its_entry_point_several_run_in_one_job(config):
    _, one = plan(SubmitOptions(config_path=config, steps="generate", address=ADDRESS, python="python",
                                overrides=["budget_usd=5"]))
    assert shlex.split(one.entrypoint) == ["python", "jobs/generate.py", "submitted/pipeline.yaml", "-o", "budget_usd=5"]
    assert one.submission_id.startswith("unit-run-generate-")
    _, several = plan(SubmitOptions(config_path=config, steps="prompts,generate,filter", address=ADDRESS,
                                    python="python"))
    assert shlex.split(several.entrypoint)[1:] == ["jobs/run.py", "submitted/pipeline.yaml", "--steps",
                                                   "prompts,generate,filter"]
    assert several.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert several.secret_env_names[0] == "UNIT_TEACHER_KEY" and several.entrypoint_num_gpus is None


def test_gpu_steps_ask_for_a_gpu_for_their_driver(config):
    base = load_config(config)
    gpu = load_config(config, ["train.use_gpu=true"])
    step = Step("train", "distill_ray.steps:no_gpu", entrypoint_gpus=one_gpu_if_use_gpu)
    assert (step.entrypoint_gpus(base), step.entrypoint_gpus(gpu)) == (0, 1)
    _, job = plan(SubmitOptions(config_path=config, steps="prompts", address=ADDRESS, entrypoint_gpus=0.5))
    assert job.entrypoint_num_gpus == 0.5


def test_staged_working_dir_has_the_code_and_the_config_only(config, tmp_path):
    staged = stage(SubmitOptions(config_path=config, address=ADDRESS), tmp_path / "stage")
    names = sorted(p.name for p in staged.iterdir())
    assert names == ["distill_ray", "jobs", "pyproject.toml", "submitted"]
    assert (staged / "submitted" / "pipeline.yaml").read_text() == config.read_text()
    assert not list(staged.rglob("__pycache__"))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "prompts,distil"], "--steps: unknown step(s) distil; available: prompts, generate, filter"),
    (["--env", "UNIT_TEACHER_KEY=sk-123456"], "--env: UNIT_TEACHER_KEY looks like a secret"),
    (["--env", "HF_TOKEN=hf_abc"], "--env: HF_TOKEN looks like a secret"),
    (["-o", "teachers.0.base_url=https://me:pw@api.example.com/v1"], "a URL carries credentials"),
    (["-o", "teachers.0.api_key=sk-123"], "teachers.0: 'api_key' holds a secret"),
    (["--wheel", "dist/nope.whl"], "--wheel: dist/nope.whl: no such file"),
])
def test_bad_input_is_exit_2_before_connecting(config, argv, message, capsys):
    assert main(["submit", str(config), "--address", ADDRESS, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_address_is_explained(config, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", str(config), "--steps", "prompts"]) == 2
    assert "no cluster address: pass --address" in capsys.readouterr().err


def test_a_secret_value_in_an_uploaded_file_is_refused(config, tmp_path, monkeypatch):
    secret = "sk-unit-0123456789"
    monkeypatch.setenv("UNIT_TEACHER_KEY", secret)
    config.write_text(config.read_text() + f"\n# my key: {secret}\n")
    options = SubmitOptions(config_path=config, steps="generate", address=ADDRESS)
    _, job = plan(options)
    staged = stage(options, tmp_path / "stage")
    with pytest.raises(Exception, match="submitted/pipeline.yaml.*holds the value of UNIT_TEACHER_KEY") as caught:
        refuse_if_secrets_sent(job, staged, ADDRESS)
    assert secret not in str(caught.value)
    assert main(["submit", str(config), "--address", ADDRESS, "--steps", "generate"]) == 2


@pytest.mark.parametrize("status, driver_code, expected", [
    ("SUCCEEDED", 0, 0),
    ("FAILED", 1, 1),     # a step failed on the cluster
    ("FAILED", 2, 2),     # the job's distill-ray verb found bad input there
    ("FAILED", None, 1),  # the driver never started (runtime_env setup failed)
    ("STOPPED", 130, 1),  # `distill-ray jobs stop`: the driver's own code is not passed on
])
def test_submit_exits_with_the_jobs_status(status, driver_code, expected):
    assert exit_code(status, driver_code) == expected
