"""The main job end to end, smaller: `distill-ray run` on the bundled example with the real offline
teacher (SmolLM2, launched and stopped by the run), 120 prompts, two small layer-dropped students
for a few steps, eval, the serve replay (shadow, then canary) and drift. Slow: about 6 minutes.

    scripts/test.sh -m slow tests/e2e
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill_ray.cli import main
from distill_ray.serve.logs import read_logs
from distill_ray.storage import Workdir

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "jobs" / "configs" / "support_orders.yaml"


@pytest.mark.slow
def test_the_whole_pipeline_on_the_example(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workdir = tmp_path / "run"
    overrides = [
        f"workdir={workdir}", "prompts.size=120", "prompts.holdout_min_per_category=3", "prompts.min_per_category=5",
        "students=[{name: small, base_model: smollm2, layer_drop: {keep_first: 2}, train: {learning_rate: 5.0e-4}},"
        " {name: tiny, base_model: smollm2, layer_drop: {keep_first: 1}}]",
        "train.max_steps=3", "train.eval_every_steps=3", "train.eval_sample_size=4", "train.batch_size=8",
        "eval.latency_samples=4", "serve.port=8731",
        # A few steps cannot reach the example's bar; this test is about the run, not the student.
        "task.bar={min_relative_quality: 0.0, min_slice_relative_quality: 0.0, max_p95_latency_ms: 60000,"
        " max_cost_per_1k_requests_usd: 10}",
    ]
    args = ["run", str(EXAMPLE)] + [x for o in overrides for x in ("-o", o)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "distillation summary" in out and "student small" in out and "student tiny" in out
    replay = json.loads((workdir / "serve" / "replay.json").read_text())
    holdout = replay["phases"]["shadow"]["requests"]
    assert holdout > 0 and all(p["errors"] == 0 for p in replay["phases"].values())
    assert replay["phases"]["shadow"]["served_by"] == {"teacher": holdout}
    assert set(replay["phases"]["canary"]["served_by"]) <= {"student", "teacher"}
    logs = read_logs(Workdir(str(workdir)))
    assert len(logs) == 2 * holdout and sum(1 for x in logs if x["mode"] == "shadow") == holdout
    assert json.loads((workdir / "drift" / "report.json").read_text())["verdict"] in ("ok", "drift")
    # Rerunning skips every finished step.
    assert main(args) == 0
    assert capsys.readouterr().out.count("nothing to do") >= 6
    assert not os.environ.get("RAY_ADDRESS")
