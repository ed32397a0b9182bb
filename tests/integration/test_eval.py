"""`distill-ray eval` on a real local Ray: an untrained student against the scripted teacher,
answering through vLLM (its CPU build) in a Ray Data actor pool, its speed timed on that engine.

One eval runs for the module (`evaluated`); the gate, the threshold, the page in headless Chromium
and the LLM judge are checked apart, so only the page's check is skipped where there is no Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from distill_ray.cli import main
from distill_ray.config.schema import Bar
from distill_ray.eval.decision import ms, shortfalls, usd
from distill_ray.eval.scoring import Scored, quality
from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.storage import Workdir
from tests.helpers.models import save_tiny_student
from tests.helpers.steps import train_config as _config

pytestmark = pytest.mark.usefixtures("ray_local")


@dataclass
class Evaluated:
    """What `distill-ray eval` left: its config, workdir, exit code and output."""

    path: Path
    config: dict
    workdir: Path
    code: int
    out: str
    err: str

    def read(self, name: str) -> list[dict] | dict:
        text = (self.workdir / "eval" / name).read_text()
        return json.loads(text) if name.endswith(".json") else [json.loads(x) for x in text.splitlines()]


@pytest.fixture(scope="module")
def vllm_student(tmp_path_factory) -> Path:
    """test_train's tiny Llama with heads of 32 dimensions (2 heads of a 64-wide model): vLLM's CPU
    attention has no kernel for test_train's 16."""
    return save_tiny_student(tmp_path_factory.mktemp("tiny-vllm-student"), heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def evaluated(filtered, vllm_student, tmp_path_factory) -> Evaluated:
    """`distill-ray eval` once, through vLLM, of an untrained student where `distill-ray train` leaves a
    finished one (eval reads the best export and the step's manifest; training itself is test_train's)."""
    tmp = tmp_path_factory.mktemp("eval")
    path = _config(tmp, filtered, vllm_student)
    config = json.loads(path.read_text())
    # One worker: one engine start per eval (about 40 s on this CPU), the speed timed on it too.
    config["eval"] = {"batch_size": 4, "latency_samples": 4, "num_workers": 1}
    config["task"]["bar"] = {"min_relative_quality": 0.9, "min_slice_relative_quality": 0.8,
                             "max_p95_latency_ms": 60000, "max_cost_per_1k_requests_usd": 1.0,
                             "min_slice_holdout_rows": 1}
    path.write_text(json.dumps(config))
    workdir = Path(config["workdir"])
    shutil.copytree(vllm_student, workdir / "students" / "mini" / "best")
    write_manifest(Workdir(str(workdir)), StepRecord("students/mini", {}, {}))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["eval", str(path)])
    return Evaluated(path, config, workdir, code, out.getvalue(), err.getvalue())


def test_an_untrained_student_fails_the_gate(evaluated):
    assert evaluated.code == 1
    err, out = evaluated.err, evaluated.out
    assert "no student meets the bar" in err and "min_relative_quality" in err
    assert re.search(r"min_slice_relative_quality\[(shipping|refund)\]", err)
    assert "eval[mini]: relative quality" in out and "recommended serve.min_confidence" in out

    mini = evaluated.read("metrics.json")["students"]["mini"]
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
    answered = evaluated.read("rows.jsonl")
    assert answered and all(r["confidence"] is not None and r["confidence"] <= 0 for r in answered)
    assert mini["calibration"] and sum(b["rows"] for b in mini["calibration"]) == len(answered)
    # Each disagreement carries the prompt's text (its last turn) beside both answers.
    disagreements = evaluated.read("disagreements.jsonl")
    assert len(disagreements) == sum(1 for r in answered if r["agreement"] < 1) > 0
    assert all(d["prompt"] and d["teacher_answer"] and d["prompt"] != d["teacher_answer"] for d in disagreements)
    page = (evaluated.workdir / "eval" / "report.html").read_text()
    assert 'class="slice-bars"' in page and 'class="slices"' in page and 'class="calibration"' in page
    assert "No student meets the bar" in page


def test_the_recommended_threshold_gives_the_served_quality_it_promised(evaluated):
    """The recommended threshold, applied to the holdout rows, gives the served quality it promised."""
    mini = evaluated.read("metrics.json")["students"]["mini"]
    scored = [Scored(**{k: v for k, v in r.items() if k != "student_name"}) for r in evaluated.read("rows.jsonl")]
    threshold = mini["threshold"]
    served = [threshold["min_confidence"] is None or (r.confidence is not None and r.confidence >= threshold["min_confidence"])
              for r in scored] if threshold["meets_bar"] else [False] * len(scored)
    assert quality(scored, served)["overall"] == threshold["served"]["overall"]
    bar = Bar(**evaluated.config["task"]["bar"])
    assert threshold["served"]["overall"]["relative_quality"] >= bar.min_relative_quality


def test_the_report_as_a_person_sees_it_in_chromium(evaluated, tmp_path):
    """The page in headless Chromium (no server): a screenshot under the test's tmp folder, and what the
    browser laid out: the decision on top, the teacher's and the student's figures side by side, the
    threshold on the calibration chart, the disagreements' text."""
    from tests.browser import png_size, render, screenshot

    page = evaluated.workdir / "eval" / "report.html"
    png = screenshot(page, tmp_path / "report.png")
    assert png_size(png) == (1280, 2400) and png.stat().st_size > 20_000  # a blank page is a few KB
    metrics = evaluated.read("metrics.json")
    mini = metrics["students"]["mini"]
    shown = render(page)
    marks: dict[str, list[dict]] = {}
    for m in shown["marks"]:
        marks.setdefault(m["cls"].split()[0], []).append(m)

    # On top, on the first screen: no student ships, and what the student missed, by how much.
    line = marks["decision-line"][0]
    assert line["visible"] and line["top"] < 300
    assert line["text"].startswith("No student meets the bar: ship none")
    decision = marks["decision"][0]["text"]
    assert all(s in decision for s in shortfalls(mini)) and "(0.90 short)" in decision
    assert line["top"] < marks["side-by-side"][0]["top"] < marks["student"][0]["top"]

    # Side by side: the teacher's figures and the student's, rounded, with units.
    table = next(t for t in shown["tables"] if t["cls"] == "side-by-side")
    assert table["visible"] and table["head"] == ["", "teacher", "mini"]
    rows = {r[0]: r[1:] for r in table["rows"]}
    assert rows["p95 latency"] == [ms(metrics["teacher"]["p95_latency_ms"]), ms(mini["latency"]["p95_latency_ms"])]
    assert rows["cost per 1k requests"] == [usd(metrics["teacher"]["cost_per_1k_requests_usd"]),
                                            usd(mini["cost_per_1k_requests_usd"])]
    assert rows["relative quality (student / teacher)"] == ["1.00", f"{mini['quality']['overall']['relative_quality']:.2f}"]
    assert rows["verdict"] == ["–", "FAIL"]

    # The calibration chart: labelled axes, a point per bucket, the recommended threshold drawn on it.
    svgs = {s["cls"]: s for s in shown["svgs"]}
    curve, buckets = svgs["calibration"], len(mini["calibration"])
    assert curve["visible"] and curve["points"] == buckets > 0 and curve["lines"] == (1 if buckets > 1 else 0)
    assert marks["axis-x"][0]["text"].startswith("student confidence") and marks["axis-y"][0]["visible"]
    threshold = mini["threshold"]
    label = marks["threshold-label"][0]
    assert label["visible"]
    if threshold["meets_bar"] and threshold["min_confidence"] is not None:
        marker = marks["threshold"][0]
        assert marker["visible"] and marker["h"] > 100  # a line across the chart's height
        drawn = re.search(r"serve\.min_confidence (-?[\d.]+): (\d+%|<1%|>99%) fall back", label["text"])
        assert drawn and abs(float(drawn.group(1)) - threshold["min_confidence"]) < 0.01
    else:
        assert "threshold" not in marks and "no threshold" in label["text"]

    # Per slice: bars for student and teacher, and the table with the numbers.
    slices = mini["quality"]["slices"]
    bars = svgs["slice-bars"]
    assert bars["visible"] and bars["w"] > 200 and bars["h"] > 20
    assert bars["rects"] >= len(slices)  # a teacher bar per slice at least (a zero-score student bar has no width)
    slice_table = next(t for t in shown["tables"] if t["cls"] == "slices")
    assert slice_table["visible"] and slice_table["head"][:2] == ["slice", "rows"]
    assert {row[0]: int(row[1]) for row in slice_table["rows"]} == {s: v["rows"] for s, v in slices.items()}

    # The worst disagreements: the prompt's text and both answers, as a reader sees them.
    worst = next(t for t in shown["tables"] if t["cls"] == "disagreements")
    assert worst["head"][:4] == ["slice", "prompt", "student answer", "teacher answer"]
    prompts = {d["prompt"].strip(): d for d in evaluated.read("disagreements.jsonl")}
    assert worst["rows"] and all(row[1] in prompts and row[3] == prompts[row[1]]["teacher_answer"]
                                 for row in worst["rows"])


def test_an_llm_judge_scores_the_answers(evaluated, tmp_path, capsys):
    """metric llm_judge on a copy of the same workdir: the judge's verdicts are the scores, its calls go
    through generate's machinery (rate limited, cached in eval/judge/), and a rerun pays for none."""
    from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
    from tests.fakes.judge import verdict

    workdir = tmp_path / "run"
    shutil.copytree(evaluated.workdir, workdir)
    config = json.loads(json.dumps(evaluated.config))
    path = tmp_path / "config.yaml"
    with FakeTeacher(FakeTeacherConfig(answer_fn="tests.fakes.judge:lenient")) as judge:
        config["workdir"] = str(workdir)
        config["teachers"][0].update({"base_url": judge.base_url, "requests_per_minute": 600, "max_concurrency": 4})
        config["task"]["metric"] = "llm_judge"
        # The student answers through transformers here: what is checked is the judge, whatever engine
        # answered (vLLM was checked above); each vLLM start would add about 40 s, and there are two evals.
        config["eval"]["engine"] = {"backend": "transformers"}
        config["eval"]["judge_max_tokens"] = 2
        path.write_text(json.dumps(config))
        assert main(["eval", str(path)]) in (0, 1)
        out = capsys.readouterr().out
        billed = judge.stats()["answered"]
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
