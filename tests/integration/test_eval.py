"""`distill-ray eval` on a real local Ray: a barely trained student against the scripted teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distill_ray.cli import main
from distill_ray.config.schema import Bar
from distill_ray.eval.scoring import Scored, quality
from tests.integration.test_generate import prompt_set  # noqa: F401 - fixture
from tests.integration.test_train import _config, filtered, student_folder  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("ray_local")


def test_a_student_stopped_after_one_step_fails_the_gate(filtered, student_folder, tmp_path, capsys):  # noqa: F811
    path = _config(tmp_path, filtered, student_folder, max_steps=1, eval_every_steps=1)
    config = json.loads(path.read_text())
    config["eval"] = {"batch_size": 4, "latency_samples": 4}
    config["task"]["bar"] = {"min_relative_quality": 0.9, "min_slice_relative_quality": 0.8,
                             "max_p95_latency_ms": 60000, "max_cost_per_1k_requests_usd": 1.0,
                             "min_slice_holdout_rows": 1}
    path.write_text(json.dumps(config))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no student meets the bar" in err and "min_relative_quality" in err
    assert re.search(r"min_slice_relative_quality\[(shipping|refund)\]", err)

    workdir = Path(config["workdir"])
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    mini = metrics["students"]["mini"]
    assert set(mini["quality"]["slices"]) == {"shipping", "refund"}
    assert mini["latency"]["p95_latency_ms"] > 0 and mini["cost_per_1k_requests_usd"] > 0
    page = (workdir / "eval" / "report.html").read_text()
    assert 'class="slice-bars"' in page and 'class="slices"' in page and 'class="calibration"' in page

    # The recommended threshold, applied to the holdout rows, gives the served quality it promised.
    rows = [json.loads(x) for x in (workdir / "eval" / "rows.jsonl").read_text().splitlines()]
    scored = [Scored(**{k: v for k, v in r.items() if k != "student_name"}) for r in rows]
    threshold = mini["threshold"]
    served = [threshold["min_confidence"] is None or (r.confidence is not None and r.confidence >= threshold["min_confidence"])
              for r in scored] if threshold["meets_bar"] else [False] * len(scored)
    assert quality(scored, served)["overall"] == threshold["served"]["overall"]
    assert threshold["served"]["overall"]["relative_quality"] >= Bar(**config["task"]["bar"]).min_relative_quality
