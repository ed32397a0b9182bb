"""Step 6: each student against the teacher on the holdout, per slice, with latency, cost,
calibration and the gate (`task.bar`).

Writes `eval/metrics.json` (everything below, per student), `eval/disagreements.jsonl` (rows where
student and teacher differ, worst slices first, the prompt's last turn and both answers),
`eval/rows.jsonl` (every holdout row scored, with the student's confidence), `eval/report.html`
(`distill_ray.eval.report`: readable without a server) and the manifest. Exits 1 when no student
passes every item of the bar, naming the failing items and slices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from distill_ray.chat import student_messages
from distill_ray.config.schema import PipelineConfig
from distill_ray.errors import StepFailed
from distill_ray.eval.scoring import (
    calibration,
    gate,
    pairs_to_score,
    percentile,
    quality,
    recommend_threshold,
    score_rows,
)
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.metrics import holdout_target, metric
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

STEP = "eval"


class GateFailed(StepFailed):
    """No student meets the bar (exit 1)."""


def holdout_rows(config: PipelineConfig, workdir: Workdir) -> list[dict[str, Any]]:
    """The holdout prompts with the reference teacher's answer (sample 0).

    `trusted` says whether that answer passed the filters (True when there is no filter step); which
    answer a row is scored against is `holdout_target`'s rule.
    """
    teacher = config.reference_teacher.name
    kept = None
    if read_manifest(workdir, "filtered"):
        kept = {(r["id"], r["sample"]): r["kept"] for r in workdir.read_table("filtered", "rows").to_pylist()
                if r["teacher"] == teacher and r["split"] == "holdout"}
    rows = [r for r in workdir.read_table("teacher", "answers").to_pylist()
            if r["split"] == "holdout" and r["teacher"] == teacher and r["sample"] == 0]
    rows.sort(key=lambda r: r["id"])
    if config.eval.limit:
        rows = rows[: config.eval.limit]
    return [{"id": r["id"], "category": r["category"], "reference": r["reference"],
             "teacher": (r["completion"] or "").strip() if not r["error"] else None,
             "trusted": True if kept is None else bool(kept.get((r["id"], 0), False)),
             "teacher_cost_usd": r["cost_usd"] or 0.0, "teacher_latency_s": r["latency_s"],
             "messages": student_messages(config.task, r["messages"])} for r in rows]


def run_eval(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every trained student; returns the manifest. Raises GateFailed when none passes."""
    workdir = Workdir(config.workdir)
    teacher_manifest = read_manifest(workdir, "teacher")
    if not teacher_manifest:
        raise MissingInput(f"no teacher answers in {workdir.uri_of('teacher')}: run `distill-ray generate` first")
    students = {}
    for student in config.students:
        manifest = read_manifest(workdir, f"students/{student.name}")
        if not manifest or manifest.get("status") != "complete":
            raise MissingInput(f"student '{student.name}' has no finished training in "
                               f"{workdir.uri_of('students', student.name)}: run `distill-ray train` first")
        students[student.name] = manifest
    filtered_manifest = read_manifest(workdir, "filtered") or {}
    record = StepRecord(STEP, {"teacher": teacher_manifest["fingerprint"], "filtered": filtered_manifest.get("fingerprint"),
                               **{f"students/{n}": m["fingerprint"] for n, m in students.items()}},
                        {"eval": config.eval.model_dump(mode="json"), "task": config.task.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        echo(f"eval: up to date ({workdir.uri_of(STEP, 'report.html')}); nothing to do")
        _raise_if_failed(manifest["results"])
        return manifest
    t0 = time.perf_counter()
    every = [r for r in holdout_rows(config, workdir) if r["teacher"] is not None]
    rows = [r for r in every if holdout_target(r) is not None]
    untrusted = len(every) - len(rows)
    if not rows:
        raise MissingInput("eval: no holdout prompt has a reference or a teacher answer that passed the filters")
    if untrusted:
        echo(f"eval: {untrusted} of {len(every)} holdout prompts not scored: no reference, and the filters "
             "rejected the teacher's answer (no trusted target)")
    score, judge = scorer(config, workdir, echo)
    teacher_cost = 1000 * sum(r["teacher_cost_usd"] for r in rows) / len(rows)
    teacher_latencies = sorted(r["teacher_latency_s"] * 1000 for r in rows if r["teacher_latency_s"] is not None)
    teacher_side = {"cost_per_1k_requests_usd": round(teacher_cost, 6),
                    "p95_latency_ms": round(percentile(teacher_latencies, 95), 1) if teacher_latencies else None}
    results, disagreements, scored_rows = {}, [], []
    predicted = {}
    for name in students:
        uri = workdir.uri_of("students", name, "best")
        predictions, speed = predict_holdout(config, uri, rows)
        predicted[name] = ([{**r, **predictions[r["id"]]} for r in rows], speed, uri)
    if judge is not None:  # one fan-out of judge calls for every student's pairs
        judge.prepare([pair for student_rows, _, _ in predicted.values() for pair in pairs_to_score(student_rows)])
        echo(f"eval: judge {judge.teacher.name}: {judge.stats['calls']} calls, {judge.stats['cached']} cached, "
             f"{judge.stats['errors']} errors, {judge.stats['unparsed']} unreadable verdicts, "
             f"${judge.stats['cost_usd']:.4f} spent on judging")
    for name, (student_rows, speed, uri) in predicted.items():
        scored = score_rows(student_rows, score)
        scored_rows += [{"student_name": name, **vars(r)} for r in scored]
        q = quality(scored)
        cost = speed["seconds_per_request_at_batch"] * config.eval.price_per_instance_hour_usd / 3600 * 1000
        items = gate(q, speed["p95_latency_ms"], cost, config.task.bar)
        failed = [i for i in items if i["passed"] is False]
        results[name] = {
            "student": name, "checkpoint": uri, "parameters": speed["parameters"], "quality": q,
            "calibration": calibration(scored), "threshold": recommend_threshold(scored, config.task.bar),
            "latency": speed, "cost_per_1k_requests_usd": round(cost, 6), "gate": items,
            "passed": not failed, "failed": [i["item"] for i in failed],
        }
        worst = sorted(q["slices"], key=lambda s: q["slices"][s]["relative_quality"])
        order = {s: i for i, s in enumerate(worst)}
        asked = {row["id"]: row["messages"][-1]["content"] for row in student_rows}  # the prompt's last turn
        for r in sorted((r for r in scored if r.agreement < 1), key=lambda r: (order[r.category], r.id)):
            disagreements.append({"student": name, "id": r.id, "category": r.category, "prompt": asked[r.id],
                                  "student_answer": r.student,
                                  "teacher_answer": r.teacher, "confidence": r.confidence,
                                  "student_score": r.student_score, "teacher_score": r.teacher_score})
        echo(student_summary(results[name]))
    report = {"holdout_rows": len(rows), "holdout_rows_without_trusted_target": untrusted, "metric": config.task.metric, "bar": config.task.bar.model_dump(),
              "teacher": teacher_side, "students": results}
    if judge is not None:
        report["judge"] = {"teacher": judge.teacher.name, **judge.stats}
    workdir.write_json(report, STEP, "metrics.json")
    workdir.write_bytes("".join(json.dumps(d) + "\n" for d in disagreements).encode(), STEP, "disagreements.jsonl")
    workdir.write_bytes("".join(json.dumps(r) + "\n" for r in scored_rows).encode(), STEP, "rows.jsonl")
    from distill_ray.eval.report import render

    workdir.write_bytes(render(report, disagreements).encode(), STEP, "report.html")
    record.counts = {"holdout_rows": len(rows), "disagreements": len(disagreements)}
    record.timings = {"total": time.perf_counter() - t0}
    record.extra = {"results": {n: {"passed": r["passed"], "failed": r["failed"]} for n, r in results.items()}}
    manifest = write_manifest(workdir, record)
    echo(f"eval: report in {workdir.uri_of(STEP, 'report.html')}")
    _raise_if_failed(record.extra["results"])
    return manifest


def _raise_if_failed(results: dict[str, Any]) -> None:
    if any(r["passed"] for r in results.values()):
        return
    why = "; ".join(f"{n}: {', '.join(r['failed'])}" for n, r in results.items())
    raise GateFailed(f"no student meets the bar ({why})")


def scorer(config: PipelineConfig, workdir: Workdir, echo: Callable[[str], None]) -> tuple[Any, Any]:
    """How eval scores a student's answer against its target: (score, judge). For task.metric llm_judge the
    judge is both (its verdicts cached in the workdir, paid through generate's machinery: call
    `judge.prepare(pairs)` before scoring); else the task's metric and None."""
    if config.task.metric == "llm_judge":
        from distill_ray.eval.judge import LLMJudge

        judge = LLMJudge(config, workdir, echo)
        return judge, judge
    return metric(config.task.metric, config.task.metric_pattern), None


def predict_holdout(config: PipelineConfig, uri: str,
                    rows: list[dict[str, Any]]) -> tuple[dict[str, dict], dict[str, Any]]:
    """The student's holdout answers and its speed, on `eval.engine` (`distill_ray.eval.predict`)."""
    import ray.data

    from distill_ray.eval.predict import predict
    from distill_ray.ray_env import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    return predict(uri, rows, config.eval, max(t.max_tokens for t in config.teachers))


def student_summary(r: dict[str, Any]) -> str:
    q = r["quality"]["overall"]
    t = r["threshold"]
    lines = [f"eval[{r['student']}]: relative quality {q['relative_quality']:.3f} (student {q['student']:.3f} / "
             f"teacher {q['teacher']:.3f}), agreement {q['agreement']:.3f}, p95 {r['latency']['p95_latency_ms']} ms, "
             f"${r['cost_per_1k_requests_usd']:.4f} per 1k requests; "
             + ("PASS" if r["passed"] else f"FAIL: {', '.join(r['failed'])}")]
    for name, s in r["quality"]["slices"].items():
        lines.append(f"  {name:<18} rows {s['rows']:>4}  student {s['student']:.3f}  teacher {s['teacher']:.3f}  "
                     f"relative {s['relative_quality']:.3f}")
    fallback = t["served"]["overall"]["fallback_rate"]
    lines.append(f"  recommended serve.min_confidence: {t['min_confidence']} (fallback {fallback:.1%}, served relative "
                 f"quality {t['served']['overall']['relative_quality']:.3f}"
                 + ("" if t["meets_bar"] else "; no threshold meets the bar") + ")")
    return "\n".join(lines)
