"""`distill-ray eval` on a real local Ray: an untrained student against the scripted teacher,
answering through vLLM (its CPU build) in a Ray Data actor pool, its speed timed on that engine."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from distill_ray.cli import main
from distill_ray.config.schema import Bar
from distill_ray.eval.scoring import Scored, quality
from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.storage import Workdir
from tests.helpers.models import save_tiny_student
from tests.helpers.steps import train_config as _config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def vllm_student(tmp_path_factory) -> Path:
    """test_train's tiny Llama with heads of 32 dimensions (2 heads of a 64-wide model): vLLM's CPU
    attention has no kernel for test_train's 16."""
    return save_tiny_student(tmp_path_factory.mktemp("tiny-vllm-student"), heads=2, kv_heads=1)


def _finished_student(workdir: Path, model: Path) -> None:
    """An untrained student where `distill-ray train` leaves a finished one (eval reads the best export and
    the step's manifest; training itself is test_train's)."""
    shutil.copytree(model, workdir / "students" / "mini" / "best")
    write_manifest(Workdir(str(workdir)), StepRecord("students/mini", {}, {}))


def test_an_untrained_student_fails_the_gate(filtered, vllm_student, tmp_path, capsys):  # noqa: F811
    path = _config(tmp_path, filtered, vllm_student)
    config = json.loads(path.read_text())
    # One worker: one engine start per eval (about 40 s on this CPU), the speed timed on it too.
    config["eval"] = {"batch_size": 4, "latency_samples": 4, "num_workers": 1}
    config["task"]["bar"] = {"min_relative_quality": 0.9, "min_slice_relative_quality": 0.8,
                             "max_p95_latency_ms": 60000, "max_cost_per_1k_requests_usd": 1.0,
                             "min_slice_holdout_rows": 1}
    path.write_text(json.dumps(config))
    _finished_student(Path(config["workdir"]), vllm_student)
    assert main(["eval", str(path)]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "no student meets the bar" in err and "min_relative_quality" in err
    assert re.search(r"min_slice_relative_quality\[(shipping|refund)\]", err)
    assert "eval[mini]: relative quality" in captured.out and "recommended serve.min_confidence" in captured.out

    workdir = Path(config["workdir"])
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    mini = metrics["students"]["mini"]
    assert set(mini["quality"]["slices"]) == {"shipping", "refund"}
    assert mini["latency"]["p95_latency_ms"] > 0 and mini["cost_per_1k_requests_usd"] > 0
    # The speed comes from the engine that answered: vLLM, timed alone in the pool, at batch 1 and at batch 4.
    latency = mini["latency"]
    assert latency["engine"]["engine"] == "vllm" and latency["engine"]["tensor_parallel_size"] == 1
    assert latency["engines_up_when_timed"] == "1 of 1" and latency["engine_start_s"] > 0
    assert 0 < latency["p50_latency_ms"] <= latency["p95_latency_ms"]
    assert latency["batch_size"] == 4 and latency["requests_per_s_at_batch"] > 0
    assert mini["parameters"] == latency["parameters"] == latency["engine"]["parameters"] > 0
    # Every answer carries its confidence (vLLM's token logprobs), and calibration buckets them.
    answered = [json.loads(x) for x in (workdir / "eval" / "rows.jsonl").read_text().splitlines()]
    assert answered and all(r["confidence"] is not None and r["confidence"] <= 0 for r in answered)
    assert mini["calibration"] and sum(b["rows"] for b in mini["calibration"]) == len(answered)
    page = (workdir / "eval" / "report.html").read_text()
    assert 'class="slice-bars"' in page and 'class="slices"' in page and 'class="calibration"' in page
    _check_page_in_chromium(workdir / "eval" / "report.html", mini)

    # The recommended threshold, applied to the holdout rows, gives the served quality it promised.
    rows = [json.loads(x) for x in (workdir / "eval" / "rows.jsonl").read_text().splitlines()]
    scored = [Scored(**{k: v for k, v in r.items() if k != "student_name"}) for r in rows]
    threshold = mini["threshold"]
    served = [threshold["min_confidence"] is None or (r.confidence is not None and r.confidence >= threshold["min_confidence"])
              for r in scored] if threshold["meets_bar"] else [False] * len(scored)
    assert quality(scored, served)["overall"] == threshold["served"]["overall"]
    assert threshold["served"]["overall"]["relative_quality"] >= Bar(**config["task"]["bar"]).min_relative_quality

    _check_llm_judge(path, config, capsys)


def _check_llm_judge(path: Path, config: dict, capsys) -> None:
    """metric llm_judge on the same trained student: the judge's verdicts are the scores, its calls go
    through generate's machinery (rate limited, cached in eval/judge/), and a rerun pays for none."""
    from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
    from tests.fakes.judge import verdict

    with FakeTeacher(FakeTeacherConfig(answer_fn="tests.fakes.judge:lenient")) as judge:
        config["teachers"][0].update({"base_url": judge.base_url, "requests_per_minute": 600, "max_concurrency": 4})
        config["task"]["metric"] = "llm_judge"
        # The student answers through transformers here: what is checked is the judge, whatever engine
        # answered (vLLM was checked above); each vLLM start would add about 40 s, and there are two evals.
        config["eval"]["engine"] = {"backend": "transformers"}
        config["eval"]["judge_max_tokens"] = 2
        path.write_text(json.dumps(config))
        capsys.readouterr()
        assert main(["eval", str(path)]) in (0, 1)
        out = capsys.readouterr().out
        billed = judge.stats()["answered"]
        workdir = Path(config["workdir"])
        metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
        assert metrics["metric"] == "llm_judge" and metrics["judge"]["calls"] == billed > 0
        assert f"{billed} calls" in out
        rows = [json.loads(x) for x in (workdir / "eval" / "rows.jsonl").read_text().splitlines()]
        for r in rows:  # every score is the judge's verdict (1 without a call when the answers are equal)
            if r["target_is_reference"]:
                continue
            target = r["teacher"]
            expected = 1.0 if r["student"].strip().lower() == target.strip().lower() else float(verdict(r["student"], target))
            assert r["student_score"] == expected
        assert any(r["student_score"] == 0.0 for r in rows)
        # Eval again from scratch: every verdict comes from eval/judge/, none is paid for twice.
        (workdir / "eval" / "manifest.json").unlink()
        assert main(["eval", str(path)]) in (0, 1)
        assert judge.stats()["answered"] == billed
        assert json.loads((workdir / "eval" / "metrics.json").read_text())["judge"]["cached"] == billed


def _check_page_in_chromium(page: Path, result: dict) -> None:
    """The report as a browser shows it (headless Chromium, no server): per-slice bars for student
    and teacher, the calibration curve with its points, and the slice table with the numbers."""
    from tests.browser import render

    shown = render(page)
    svgs = {s["cls"]: s for s in shown["svgs"]}
    slices = result["quality"]["slices"]
    bars = svgs["slice-bars"]
    assert bars["visible"] and bars["w"] > 200 and bars["h"] > 20
    assert bars["rects"] >= len(slices)  # a teacher bar per slice at least (a zero-score student bar has no width)
    curve = svgs["calibration"]
    buckets = len(result["calibration"])
    assert curve["visible"] and curve["points"] == buckets > 0 and curve["lines"] == (1 if buckets > 1 else 0)
    table = next(t for t in shown["tables"] if t["cls"] == "slices")
    assert table["visible"] and table["head"][:2] == ["slice", "rows"]
    assert {row[0] for row in table["rows"]} == set(slices)
    for row in table["rows"]:
        assert int(row[1]) == slices[row[0]]["rows"]
    assert "FAIL" in shown["text"].upper()
