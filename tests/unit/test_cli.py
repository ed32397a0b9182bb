"""The CLI as a user runs it: exit codes and messages for bad input, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_ray", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("workdir: w\nprompts:\n  sise: 10\n", "c.yaml:3: prompts.sise: unknown key"),
        ("workdir: w\ntrain:\n  epochs: three\n", "c.yaml:3: train.epochs: Input should be a valid integer"),
        ("workdir: w\nprompts:\n  source: {missing}\n", "prompts.source: no such file or folder"),
        ("workdir: w\nprompts:\n  source: {empty}\n", "prompts.source: the source is empty"),
    ],
)
@pytest.mark.parametrize("verb", ["validate", "prompts"])
def test_bad_input_exits_2_naming_key_and_file(tmp_path, yaml_text, expected, verb):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text.format(missing=tmp_path / "nope.jsonl", empty=empty))
    result = _run(verb, str(config))
    assert result.returncode == 2, result.stderr
    assert expected.split("{")[0] in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    if "source" in yaml_text:
        assert str(tmp_path) in result.stderr  # the file is named


def test_validate_prints_resolved_config():
    result = _run("validate", "jobs/configs/support_orders.yaml", "-o", "train.epochs=7")
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout and "near_threshold:" in result.stdout


def test_help_carries_a_worked_example():
    result = _run("prompts", "--help")
    assert result.returncode == 0 and "distill-ray prompts jobs/configs/support_orders.yaml" in result.stdout


def test_missing_config_file_exits_2(tmp_path):
    result = _run("prompts", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr and "Traceback" not in result.stderr


def test_a_model_that_is_not_there_is_bad_input(tmp_path):
    """ModelNotFoundError is a BadInput: exit 2 naming the model, no traceback (it was a traceback)."""
    missing = tmp_path / "no-such-model"
    result = _run("teacher", "serve", "--engine", "transformers", "--model", str(missing), "--port", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"model '{missing}': no such local folder" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_rollout_value_is_exit_2_before_any_app_is_asked(capsys):
    """No serve app runs here: the value is refused first (asking the app would be exit 1, nothing answers)."""
    from distill_ray.cli import main

    assert main(["rollout", str(ROOT / "jobs" / "configs" / "support_orders.yaml"), "--percent", "150"]) == 2
    err = capsys.readouterr().err
    assert "canary_percent" in err and "nothing answers" not in err
