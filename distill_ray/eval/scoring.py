"""Scoring a student against its teacher on the holdout: quality per slice, calibration, the gate.

Every holdout row is scored against a target: its reference when the log had one, otherwise the
teacher's answer (the teacher then scores 1 on it by definition). Relative quality is the student's
mean score over the teacher's, overall and per slice (category); agreement is the student's score
against the teacher's answer. Calibration relates the student's confidence (mean token logprob of
its answer) to agreement; the recommended `serve.min_confidence` is the lowest threshold whose
served mix (the student above it, the teacher below) still meets the bar, i.e. the least fallback.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill_ray.config.schema import Bar
from distill_ray.metrics import holdout_target


@dataclass
class Scored:
    """One holdout row with both answers scored."""

    id: str
    category: str
    target_is_reference: bool
    student: str
    teacher: str
    student_score: float
    teacher_score: float
    agreement: float
    confidence: float | None


def score_rows(rows: list[dict[str, Any]], score: Callable[..., float]) -> list[Scored]:
    """rows: id, category, reference, teacher (answer), student (answer), confidence, messages.

    `score(answer, target)`; a scorer with `needs_row` (the LLM judge) gets the row as well.
    """
    out = []
    for r in rows:
        has_ref = bool(r.get("reference"))
        target = holdout_target(r)
        s = (lambda a, t, r=r: score(a, t, {"prompt": r.get("messages") or []})) if getattr(score, "needs_row", False) \
            else score
        out.append(Scored(id=r["id"], category=r["category"], target_is_reference=has_ref, student=r["student"],
                          teacher=r["teacher"], student_score=s(r["student"], target),
                          teacher_score=s(r["teacher"], target), agreement=s(r["student"], r["teacher"]),
                          confidence=r.get("confidence")))
    return out


def pairs_to_score(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None, str | None]]:
    """The (row, answer, target) pairs `score_rows` will score, for a scorer that asks ahead (the judge)."""
    out = []
    for r in rows:
        target = holdout_target(r)
        row = {"prompt": r.get("messages") or []}
        out += [(row, r["student"], target), (row, r["teacher"], target), (row, r["student"], r["teacher"])]
    return out


def _relative(student: float, teacher: float) -> float:
    if teacher <= 0:
        return 1.0 if student <= 0 else float("inf")
    return student / teacher


def quality(rows: list[Scored], served_by_student: list[bool] | None = None) -> dict[str, Any]:
    """Overall and per-slice scores; with `served_by_student`, the served mix's (teacher where False)."""
    def summary(items: list[tuple[Scored, bool]]) -> dict[str, Any]:
        n = len(items)
        student = sum((r.student_score if s else r.teacher_score) for r, s in items) / n if n else 0.0
        teacher = sum(r.teacher_score for r, _ in items) / n if n else 0.0
        return {"rows": n, "student": round(student, 4), "teacher": round(teacher, 4),
                "relative_quality": round(_relative(student, teacher), 4),
                "agreement": round(sum(r.agreement for r, _ in items) / n, 4) if n else 0.0,
                "fallback_rate": round(sum(1 for _, s in items if not s) / n, 4) if n else 0.0}

    served = served_by_student or [True] * len(rows)
    by_slice: dict[str, list[tuple[Scored, bool]]] = defaultdict(list)
    for row, s in zip(rows, served, strict=True):
        by_slice[row.category].append((row, s))
    return {"overall": summary(list(zip(rows, served, strict=True))),
            "slices": {name: summary(items) for name, items in sorted(by_slice.items())}}


def calibration(rows: list[Scored], buckets: int = 5) -> list[dict[str, Any]]:
    """Agreement with the teacher per confidence bucket (equal counts, lowest confidence first)."""
    known = sorted((r for r in rows if r.confidence is not None), key=lambda r: r.confidence)
    if not known:
        return []
    size = max(1, -(-len(known) // buckets))
    out = []
    for start in range(0, len(known), size):
        chunk = known[start:start + size]
        out.append({"min_confidence": round(chunk[0].confidence, 4), "max_confidence": round(chunk[-1].confidence, 4),
                    "rows": len(chunk), "agreement": round(sum(r.agreement for r in chunk) / len(chunk), 4),
                    "student_score": round(sum(r.student_score for r in chunk) / len(chunk), 4)})
    return out


def _meets(q: dict[str, Any], bar: Bar) -> bool:
    if q["overall"]["relative_quality"] < bar.min_relative_quality:
        return False
    return all(s["relative_quality"] >= bar.min_slice_relative_quality for s in q["slices"].values()
               if s["rows"] >= bar.min_slice_holdout_rows)


def recommend_threshold(rows: list[Scored], bar: Bar) -> dict[str, Any]:
    """The confidence threshold with the least fallback whose served mix meets the bar's quality items.

    Candidates are the students' own confidences (and "never fall back"); the row at the threshold is
    served by the student. Returns the threshold, the served quality it gives on this holdout, and
    its fallback rate overall and per slice. With no threshold meeting the bar, everything falls
    back (threshold None, fallback 1.0) and `meets_bar` is False.
    """
    confidences = sorted({r.confidence for r in rows if r.confidence is not None})
    candidates: list[float | None] = [None, *confidences]  # None: serve every answer from the student
    for threshold in candidates:
        served = [threshold is None or (r.confidence is not None and r.confidence >= threshold) for r in rows]
        q = quality(rows, served)
        if _meets(q, bar):
            return {"min_confidence": threshold, "meets_bar": True, "served": q}
    served = [False] * len(rows)
    return {"min_confidence": None, "meets_bar": False, "served": quality(rows, served)}


def gate(q: dict[str, Any], latency_p95_ms: float, cost_per_1k_usd: float, bar: Bar) -> list[dict[str, Any]]:
    """Every item of the bar with its value and verdict; slices too small to judge are listed, not gated."""
    items = [
        {"item": "min_relative_quality", "value": q["overall"]["relative_quality"], "bar": bar.min_relative_quality,
         "passed": q["overall"]["relative_quality"] >= bar.min_relative_quality},
        {"item": "max_p95_latency_ms", "value": round(latency_p95_ms, 1), "bar": bar.max_p95_latency_ms,
         "passed": latency_p95_ms <= bar.max_p95_latency_ms},
        {"item": "max_cost_per_1k_requests_usd", "value": round(cost_per_1k_usd, 6),
         "bar": bar.max_cost_per_1k_requests_usd, "passed": cost_per_1k_usd <= bar.max_cost_per_1k_requests_usd},
    ]
    for name, s in q["slices"].items():
        judged = s["rows"] >= bar.min_slice_holdout_rows
        items.append({"item": f"min_slice_relative_quality[{name}]", "value": s["relative_quality"],
                      "bar": bar.min_slice_relative_quality, "rows": s["rows"],
                      "passed": (s["relative_quality"] >= bar.min_slice_relative_quality) if judged else None})
    return items


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]
