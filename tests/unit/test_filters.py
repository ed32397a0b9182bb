"""Metrics and the filter step on a teacher answer table (no Ray, no teacher calls)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from distill_ray.cli import main
from distill_ray.config import ConfigError, load_config
from distill_ray.filters.step import run_filter
from distill_ray.filters.verifiers import FilterError
from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.metrics import json_match, normalized_match, token_f1
from distill_ray.storage import Workdir
from distill_ray.teacher.ask import ANSWER_SCHEMA


def test_metrics():
    assert normalized_match(" ord-123456. ", "ORD-123456") == 1.0
    assert normalized_match("ORD-123457", "ORD-123456") == 0.0
    assert json_match('{"a": 1, "b": [2]}', '{"b":[2],"a":1}') == 1.0 and json_match("{", "{}") == 0.0
    assert token_f1("the red box", "red box") == pytest.approx(0.8)


def _row(i: int, completion: str | None, *, teacher="t1", mean=-0.1, reference=None, error=None, split="train"):
    return {"id": f"p{i}", "split": split, "category": "c", "reference": reference, "teacher": teacher, "model": "m",
            "sample": 0, "messages": [{"role": "user", "content": f"msg {i}"}], "completion": completion,
            "tokens": [], "token_logprobs": [], "top_logprobs": "[]", "mean_logprob": mean, "prompt_tokens": 5,
            "completion_tokens": 1, "cost_usd": 0.0, "latency_s": 0.1, "attempts": 1, "finish_reason": "stop",
            "error": error, "error_kind": "500" if error else None}


@pytest.fixture
def answers(tmp_path):
    rows = [
        _row(0, "ORD-100000", reference="ORD-100000"),
        _row(1, "Sure! The order is ORD-1"),  # regex
        _row(2, "NONE", mean=-2.0),  # confidence
        _row(3, "ORD-999999", reference="ORD-100003"),  # wrong against the reference
        _row(4, None, error="HTTP 500"),  # teacher error
        _row(5, "ORD-100005", teacher="t1"), _row(5, "ORD-100005", teacher="t2"),
        _row(6, "ORD-100006", teacher="t1"), _row(6, "NONE", teacher="t2"),  # teachers disagree
        _row(7, "ORD-100007", split="holdout"),
    ]
    work = Workdir(str(tmp_path / "run"))
    work.write_table(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), "teacher", "answers")
    write_manifest(work, StepRecord("teacher", {}, {}))
    return work


FILTERS = [
    "filters=[{kind: regex, pattern: '^(ORD-\\d{6}|NONE)$'}, {kind: min_mean_logprob, threshold: -0.5},"
    " {kind: reference_match, metric: normalized_match}, {kind: agreement, min_agreement: 1.0}]",
    "prompts.reference_field=order_id",
]


def test_filters_apply_in_order_and_record_reasons(answers, capsys):
    config = load_config(None, [f"workdir={answers.uri}", *FILTERS])
    manifest = run_filter(config)
    rows = answers.read_table("filtered", "rows").to_pylist()
    reason = {(r["id"], r["teacher"]): r["drop_reason"] for r in rows}
    assert reason[("p0", "t1")] is None and reason[("p7", "t1")] is None
    assert reason[("p1", "t1")].startswith("regex:")
    assert reason[("p2", "t1")].startswith("min_mean_logprob: -2.000")
    assert reason[("p3", "t1")].startswith("reference_match:")
    assert reason[("p4", "t1")] == "teacher_error: 500"
    assert reason[("p5", "t1")] is None and reason[("p5", "t2")] is None
    assert reason[("p6", "t1")].startswith("agreement: 0.50") and reason[("p6", "t2")].startswith("agreement")
    assert all(r["kept"] == (r["drop_reason"] is None) for r in rows)
    report = answers.read_json("filtered", "report.json")
    assert report["dropped_by_reason"] == {"agreement": 2, "regex": 1, "min_mean_logprob": 1,
                                           "reference_match": 1, "teacher_error": 1}
    assert report["kept_by_split"] == {"train": 3, "holdout": 1}
    assert manifest["counts"]["kept"] == 4
    assert "dropped" in capsys.readouterr().out
    assert run_filter(config)["finished_at"] == manifest["finished_at"]  # unchanged inputs: nothing to do


def test_python_filter_and_bad_python_filter(answers, tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text("def no_none(row):\n    return 'said NONE' if row['completion'] == 'NONE' else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_filter(load_config(None, [f"workdir={answers.uri}", "filters=[{kind: python, function: 'my_checks:no_none'}]"]))
    rows = answers.read_table("filtered", "rows").to_pylist()
    assert {r["id"] for r in rows if (r["drop_reason"] or "").startswith("python my_checks:no_none: said NONE")} == {
        "p2", "p6"}
    with pytest.raises(FilterError, match="nope_module"):
        run_filter(load_config(None, [f"workdir={answers.uri}", "filters=[{kind: python, function: 'nope_module:f'}]"]))


def test_filter_before_generate_is_exit_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"workdir: {tmp_path / 'empty'}\n")
    assert main(["filter", str(config)]) == 2
    assert "run `distill-ray generate` first" in capsys.readouterr().err


def test_grounded_filter_drops_answers_not_in_the_prompt():
    from distill_ray.config.schema import GroundedFilter
    from distill_ray.filters.verifiers import build_check

    check = build_check(GroundedFilter(kind="grounded", pattern=r"ORD-\d+", allow=["NONE"]))
    row = _row(0, "ORD-512874")
    row["messages"] = [{"role": "system", "content": "e.g. ORD-512874"},
                       {"role": "user", "content": "where is ord-268193?"}]
    assert check(row) == "grounded: 'ORD-512874' is not in the prompt"  # only in the system turn: copied
    assert check({**row, "completion": "ORD-268193"}) is None  # case-insensitive by default
    assert check({**row, "completion": "none"}) is None
    whole = build_check(GroundedFilter(kind="grounded", ignore_case=False))
    assert whole({**row, "completion": "ORD-268193"}) == "grounded: 'ORD-268193' is not in the prompt"
    assert whole({**row, "completion": "ord-268193"}) is None
    with pytest.raises(ConfigError, match=r"filters\.0\.grounded\.pattern.*not a valid regular expression"):
        load_config(None, ["filters=[{kind: grounded, pattern: '(ORD'}]"])
