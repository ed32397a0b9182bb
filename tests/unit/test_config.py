"""Config loading: strict keys, line numbers, overrides with types, secrets, shipped configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill_ray.config import ConfigError, is_pipeline_config, load_config, resolved_yaml
from tests.conftest import ROOT


def _problems(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_unknown_key_names_key_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nworkdir: /tmp/w\nprompts:\n  size: 10\n  sizee: 12\n")
    (problem,) = _problems(cfg)
    assert (problem.key, problem.line, problem.file) == ("prompts.sizee", 5, str(cfg))
    assert "unknown key" in problem.message
    assert str(problem).startswith(f"{cfg}:5: prompts.sizee:")


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "workdir: w\ntask:\n  metric: exactt\nprompts:\n  holdout_fraction: lots\n"
        "teachers:\n  - name: t\n    model: m\n    api_key: sk-live-123\ntrain:\n  deepspeed: {zero_stage: 5}\n"
    )
    found = {(p.key, p.line) for p in _problems(cfg)}
    assert found == {
        ("task.metric", 3), ("prompts.holdout_fraction", 5), ("teachers.0.api_key", 9),
        ("teachers.0.base_url", 7), ("train.deepspeed.zero_stage", 11),
    }


def test_literal_secret_is_refused_and_never_echoed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\nserve:\n  auth_token: hunter2hunter2\n")
    (problem,) = _problems(cfg)
    assert problem.key == "serve.auth_token" and "environment variable" in problem.message
    assert "hunter2" not in str(problem)


def test_cross_field_rule_names_its_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\nserve:\n  teacher: nope\n")
    (problem,) = _problems(cfg)
    assert problem.key == "serve.teacher" and problem.line == 3 and "not a configured teacher" in problem.message


def test_replicas_per_node_with_vllm_is_refused_with_the_way_out(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\nserve:\n  max_replicas_per_node: 1\n")
    (problem,) = _problems(cfg)
    assert "serve.max_replicas_per_node" in f"{problem.key} {problem.message}"
    assert "student_resources" in problem.message and "backend: transformers" in problem.message
    assert load_config(cfg, ["serve.engine.backend=transformers"]).serve.max_replicas_per_node == 1


def test_teacher_request_options_and_azure_need_their_version(tmp_path):
    config = load_config(None, ["teachers.0.token_limit_param=max_completion_tokens", "teachers.0.temperature=null",
                                "teachers.0.reasoning_effort=low"])
    assert config.teachers[0].token_limit_param == "max_completion_tokens" and config.teachers[0].temperature is None
    problems = _problems(None, ["teachers.0.api=azure"])
    assert any("api_version" in p.message for p in problems)


def test_overrides_are_typed_and_reach_list_items():
    config = load_config(None, [
        "train.epochs=5", "train.use_gpu=true", "prompts.holdout_fraction=0.2", "name=12345",
        "prompts.source=[a.jsonl, b.jsonl]", "teachers.0.model=gpt-4o-mini", "budget_usd=null",
    ])
    assert config.train.epochs == 5 and config.train.use_gpu is True
    assert config.prompts.holdout_fraction == 0.2
    assert config.name == "12345"  # a number-looking name stays a string
    assert config.prompts.source == ["a.jsonl", "b.jsonl"]
    assert config.teachers[0].model == "gpt-4o-mini"
    assert config.budget_usd is None


def test_bad_overrides_are_reported_as_overrides():
    problems = _problems(None, ["train.epochs=many", "train.epochz=3", "novalue"])
    assert {(p.key, p.file) for p in problems} == {
        ("train.epochs", "override"), ("train.epochz", "override"), ("novalue", "override"),
    }


def test_defaults_run_on_a_laptop():
    config = load_config(None)
    assert config.train.use_gpu is False and config.train.num_workers == 2
    assert config.teachers[0].base_url.startswith("http://127.0.0.1")
    assert not config.workdir.startswith("s3://")


def test_resolved_yaml_masks_credentials(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    config = load_config(None, [
        "teachers.0.base_url=https://user:pa55word@api.example.com/v1?api_key=abc123",
        "teachers.0.api_key_env=MY_KEY", "teachers.0.launch=null",
    ])
    text = resolved_yaml(config)
    assert "pa55word" not in text and "abc123" not in text and "sk-secret-value" not in text
    assert "https://***@api.example.com/v1?api_key=***" in text
    assert "api_key_env: MY_KEY  # set in this environment" in text


def test_invalid_yaml_gives_the_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\nprompts:\n  size: [1\n")
    (problem,) = _problems(cfg)
    assert "not valid YAML" in problem.message and problem.line is not None


def _repo_configs() -> list[Path]:
    skip = {".venv", ".git", "runs", ".cache"}
    found = []
    for path in ROOT.rglob("*.y*ml"):
        if skip.intersection(path.relative_to(ROOT).parts):
            continue
        if is_pipeline_config(path):
            found.append(path)
    return found


def test_every_shipped_config_validates(monkeypatch):
    configs = _repo_configs()
    assert any(p.name == "support_orders.yaml" for p in configs)
    monkeypatch.chdir(ROOT)  # relative paths in shipped configs are relative to the repository
    for path in configs:
        config = load_config(path)
        assert config.workdir, path
        if not config.prompts.source if isinstance(config.prompts.source, str) else False:
            continue
        sources = [config.prompts.source] if isinstance(config.prompts.source, str) else config.prompts.source
        for source in sources:
            if not source.startswith("s3://"):
                assert os.path.exists(source), f"{path}: prompts.source {source} is missing"


def test_a_launched_teacher_must_be_local():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["teachers.0.base_url=https://api.example.com/v1"])
    assert "teachers.0" in str(err.value) and "launch: null" in str(err.value)
    assert load_config(None, ["teachers.0.base_url=https://api.example.com/v1", "teachers.0.launch=null"])


def test_engine_keys_default_to_vllm_on_a_laptop_and_refuse_impossible_gpu_settings(tmp_path):
    config = load_config(None, [])
    for engine in (config.serve.engine, config.eval.engine, config.teachers[0].engine):
        assert (engine.backend, engine.num_gpus, engine.tensor_parallel_size) == ("vllm", 0, 1)
    gpu = load_config(None, ["serve.engine.num_gpus=2", "serve.engine.tensor_parallel_size=2",
                             "serve.engine.accelerator_type=H100", "eval.engine.backend=transformers"])
    assert gpu.serve.engine.tensor_parallel_size == 2 and gpu.eval.engine.backend == "transformers"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve:\n  engine:\n    tensor_parallel_size: 2\neval:\n  engine:\n    accelerator_type: L4\n"
                   "    backend: vllm\n")
    problems = {p.key: (p.line, p.message) for p in _problems(cfg)}
    assert problems["serve.engine"][0] == 2 and "num_gpus" in problems["serve.engine"][1]
    assert problems["eval.engine"][0] == 5 and "accelerator_type 'L4' needs num_gpus > 0" in problems["eval.engine"][1]


def test_a_deepspeed_preset_that_contradicts_zero_stage_is_refused_with_what_would_do(tmp_path, capsys):
    from distill_ray.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\ntrain:\n  deepspeed:\n    preset: zero3-offload\n    zero_stage: 2\n")
    (problem,) = _problems(cfg)
    assert (problem.key, problem.line) == ("train.deepspeed", 3)
    assert ("train.deepspeed.preset 'zero3-offload' is ZeRO stage 3, but train.deepspeed.zero_stage is 2: leave "
            "zero_stage out (the preset sets it) or set it to 3, or pick a stage-2 preset (zero2)") in problem.message
    assert main(["validate", str(cfg)]) == 2
    assert "train.deepspeed.zero_stage is 2" in capsys.readouterr().err
    # a student's own train: is held to the same rule
    (problem,) = _problems(None, ["students.0.train={deepspeed: {preset: zero1, zero_stage: 3}}"])
    assert problem.key == "students.small.train"
    assert "'zero1' is ZeRO stage 1" in problem.message
    # the preset alone sets the stage; the same stage given twice is fine
    assert load_config(None, ["train.deepspeed.preset=zero3-offload"]).train.deepspeed.zero_stage == 3
    assert load_config(None, ["train.deepspeed={preset: zero1, zero_stage: 1}"]).train.deepspeed.zero_stage == 1
    assert load_config(None, ["train.deepspeed.zero_stage=3"]).train.deepspeed.preset is None


def test_each_shared_rule_is_read_from_one_place():
    config = load_config(None, [
        "teachers=[{name: a, base_url: 'http://h:1/v1', model: ma, max_tokens: 16}, "
        "{name: b, base_url: 'http://h:2/v1', model: mb, max_tokens: 8}]", "serve.teacher=b", "task.metric=llm_judge",
    ])
    assert (config.reference_teacher.name, config.fallback_teacher.name, config.judge_teacher.name) == ("a", "b", "a")
    assert config.task.string_metric == "token_f1"
    assert load_config(None, ["task.metric=json_match"]).task.string_metric == "json_match"
    from distill_ray.metrics import holdout_target

    untrusted = {"reference": None, "teacher": "42", "trusted": False}
    assert holdout_target(untrusted) is None  # eval: only an answer the filters kept
    assert holdout_target(untrusted, trusted_only=False) == "42"  # the replay: any teacher answer
    assert holdout_target({**untrusted, "reference": "41"}) == "41"
