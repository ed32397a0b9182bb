"""Eval arithmetic: relative quality per slice, calibration buckets, the recommended threshold, the gate."""

from __future__ import annotations

from distill_ray.config.schema import Bar
from distill_ray.eval.scoring import calibration, gate, percentile, quality, recommend_threshold, score_rows
from distill_ray.metrics import metric

SCORE = metric("normalized_match")


def _rows():
    rows = []
    # shipping: the student is right and confident; refund: wrong exactly where it is unsure.
    for i in range(10):
        rows.append({"id": f"s{i}", "category": "shipping", "reference": f"ORD-10000{i}", "teacher": f"ORD-10000{i}",
                     "student": f"ORD-10000{i}", "confidence": -0.01 - i / 1000})
    for i in range(10):
        wrong = i < 4
        rows.append({"id": f"r{i}", "category": "refund", "reference": None, "teacher": "NONE",
                     "student": "ORD-1" if wrong else "NONE", "confidence": -2.0 - i if wrong else -0.05})
    return score_rows(rows, SCORE)


def test_relative_quality_overall_and_per_slice():
    q = quality(_rows())
    assert q["overall"]["rows"] == 20 and q["overall"]["relative_quality"] == 0.8
    assert q["slices"]["shipping"]["relative_quality"] == 1.0 and q["slices"]["refund"]["relative_quality"] == 0.6
    assert q["slices"]["refund"]["agreement"] == 0.6 and q["overall"]["fallback_rate"] == 0.0


def test_calibration_buckets_show_low_confidence_is_wrong():
    buckets = calibration(_rows(), buckets=5)
    assert sum(b["rows"] for b in buckets) == 20
    assert buckets[0]["agreement"] == 0.0 and buckets[-1]["agreement"] == 1.0


def test_recommended_threshold_is_the_least_fallback_that_meets_the_bar():
    bar = Bar(min_relative_quality=0.95, min_slice_relative_quality=0.9, min_slice_holdout_rows=5)
    rec = recommend_threshold(_rows(), bar)
    # Falling back on 3 of the 4 unsure refund rows is enough: 19/20 overall, 9/10 for refunds.
    assert rec["meets_bar"] and rec["min_confidence"] == -2.0
    served = rec["served"]
    assert served["overall"]["fallback_rate"] == 0.15 and served["slices"]["shipping"]["fallback_rate"] == 0.0
    assert served["overall"]["relative_quality"] == 0.95 and served["slices"]["refund"]["relative_quality"] == 0.9
    strict = recommend_threshold(_rows(), Bar(min_relative_quality=1.0, min_slice_relative_quality=1.0))
    assert strict["min_confidence"] == -0.05 and strict["served"]["overall"]["fallback_rate"] == 0.2
    impossible = Bar(min_relative_quality=1.5, min_slice_relative_quality=0.9)
    assert recommend_threshold(_rows(), impossible) == {**recommend_threshold(_rows(), impossible), "meets_bar": False,
                                                        "min_confidence": None}


def test_gate_names_the_failing_items_and_slices():
    bar = Bar(min_relative_quality=0.95, min_slice_relative_quality=0.9, max_p95_latency_ms=500,
              max_cost_per_1k_requests_usd=0.05, min_slice_holdout_rows=5)
    items = {i["item"]: i for i in gate(quality(_rows()), latency_p95_ms=120.0, cost_per_1k_usd=0.01, bar=bar)}
    assert not items["min_relative_quality"]["passed"] and items["max_p95_latency_ms"]["passed"]
    assert items["min_slice_relative_quality[refund]"]["passed"] is False
    assert items["min_slice_relative_quality[shipping]"]["passed"] is True
    assert percentile([5, 1, 3, 2, 4], 95) == 5 and percentile([5, 1, 3, 2, 4], 50) == 3


def test_holdout_rows_trust_only_teacher_answers_the_filters_kept(tmp_path):
    import pyarrow as pa

    from distill_ray.config import load_config
    from distill_ray.eval.step import holdout_rows
    from distill_ray.manifest import StepRecord, write_manifest
    from distill_ray.storage import Workdir
    from distill_ray.teacher.ask import ANSWER_SCHEMA

    def answer(i, completion, reference=None):
        return {"id": f"p{i}", "split": "holdout", "category": "c", "reference": reference, "teacher": "smollm2",
                "model": "m", "sample": 0, "messages": [{"role": "user", "content": f"m{i}"}], "completion": completion,
                "cost_usd": 0.0, "latency_s": 0.1, "error": None}

    work = Workdir(str(tmp_path / "run"))
    answers = [answer(0, "ORD-1"), answer(1, "ORD-268193"), answer(2, "ORD-268193", reference="NONE")]
    work.write_table(pa.Table.from_pylist(answers, schema=ANSWER_SCHEMA), "teacher", "answers")
    config = load_config(None, [f"workdir={work.uri}"])
    assert [r["trusted"] for r in holdout_rows(config, work)] == [True, True, True]  # no filter step: all
    work.write_table(pa.Table.from_pylist([{**a, "kept": a["id"] == "p0"} for a in answers]), "filtered", "rows")
    write_manifest(work, StepRecord("filtered", {}, {}))
    assert [(r["id"], r["trusted"]) for r in holdout_rows(config, work)] == [("p0", True), ("p1", False), ("p2", False)]
