"""The real steps' outputs built for a test: a prompt set of N_PROMPTS messages, a workdir that starts from it,
a config for the scripted teacher, the teacher's answers, the filtered set, and a train config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill_ray.config import PipelineConfig, load_config
from distill_ray.steps import STEPS
from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig

KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
N_PROMPTS = 40


def run_step(name: str, config: PipelineConfig) -> None:
    """One pipeline step in this process, quietly (the runner `distill-ray run` would use)."""
    STEPS[name].load()(config, echo=lambda _: None)


def build_prompt_set(root: Path) -> Path:
    """`distill-ray prompts` over a log of N_PROMPTS distinct messages (two categories); returns the workdir."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.jsonl"
    lines = [json.dumps({"text": f"Hi team, order ORD-{100000 + i} ({['blue', 'red', 'green'][i % 3]} {i} units) "
                                 f"has not arrived after {i + 3} days", "category": ["shipping", "refund"][i % 2]})
             for i in range(N_PROMPTS)]
    log.write_text("\n".join(lines) + "\n")
    run_step("prompts", load_config(None, [f"workdir={root / 'run'}", f"prompts.source={log}", "prompts.dedupe=exact",
                                           "prompts.holdout_fraction=0.1"]))
    return root / "run"


def build_filtered(prompt_set: Path, root: Path) -> Path:
    """prompts -> generate (the scripted teacher: the right order number) -> filter, in root."""
    shutil.copytree(prompt_set / "prompts", root / "prompts")
    with FakeTeacher(FakeTeacherConfig()) as teacher:
        config = load_config(None, [f"workdir={root}", f"teachers.0.base_url={teacher.base_url}",
                                    "teachers.0.launch=null", "teachers.0.max_tokens=16"])
        run_step("generate", config)
    run_step("filter", config)
    return root


def prompts_workdir(prompt_set: Path, tmp_path: Path) -> Path:
    """A fresh workdir under tmp_path holding a copy of the prompt set's prompts."""
    run = tmp_path / "run"
    shutil.copytree(prompt_set / "prompts", run / "prompts")
    return run


def teacher_config_file(tmp_path: Path, workdir: Path, base_url: str, **teacher) -> Path:
    """A generate config for one teacher at base_url (fast retries, high limits), overridden by `teacher`."""
    t = {"name": "fake", "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
         "requests_per_minute": 60000, "max_concurrency": 8, "max_retries": 6, "retry_backoff_s": 0.01,
         "timeout_s": 2, "max_tokens": 16, "price_per_1m_input_tokens": 1000.0, "price_per_1m_output_tokens": 2000.0,
         **teacher}
    config = {"name": "gen-test", "workdir": str(workdir), "teachers": [t],
              "generate": {"num_workers": 2, "batch_size": 4, "progress_every_s": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def read_answers(workdir: Path) -> list[dict]:
    return Workdir(str(workdir)).read_table("teacher", "answers").to_pylist()


def train_config(tmp_path: Path, filtered: Path, student: Path, **train) -> Path:
    """A train config for the student `mini` (layer-dropped to 2 layers) over a copy of the filtered set."""
    workdir = tmp_path / "run"
    for step in ("prompts", "teacher", "filtered"):
        if (filtered / step).exists():
            shutil.copytree(filtered / step, workdir / step)
    settings = {"num_workers": 2, "deepspeed": {"zero_stage": 2}, "epochs": 8, "batch_size": 8,
                "learning_rate": 3e-3, "max_seq_len": 128, "eval_every_steps": 4, "eval_sample_size": 4,
                "early_stopping_patience": 0, **train}
    config = {"name": "train-test", "workdir": str(workdir),
              "task": {"instructions": "Reply with the order number or NONE.", "metric": "normalized_match"},
              "teachers": [{"name": "smollm2", "base_url": "http://127.0.0.1:9/v1", "model": "fake",
                            "max_tokens": 8}],
              "students": [{"name": "mini", "base_model": str(student), "layer_drop": {"keep_every": 2}}],
              "train": settings}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path
