"""Step 3b: `teacher/answers` -> `filtered/` (every row, with `kept` and `drop_reason`) + report.

Filters run in config order; a row is dropped by the first that objects, and that reason is kept.
Rows whose teacher call failed are dropped as `teacher_error: <kind>`. Nothing here calls the
teacher: filtering is re-run freely while the policy is tuned.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from distill_ray.config.schema import AgreementFilter, PipelineConfig
from distill_ray.filters.verifiers import agreement_reasons, build_check
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

STEP = "filtered"
EXAMPLES_PER_REASON = 5


def run_filter(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Apply `filters:` to the teacher's answers; returns the manifest.

    Raises:
        MissingInput: no teacher answers yet.
        FilterError: a filter cannot be built (exit 2).
    """
    workdir = Workdir(config.workdir)
    teacher_manifest = read_manifest(workdir, "teacher")
    if not teacher_manifest:
        raise MissingInput(f"no teacher answers in {workdir.uri_of('teacher')}: run `distill-ray generate` first")
    record = StepRecord(STEP, {"teacher": teacher_manifest["fingerprint"] + teacher_manifest["status"]},
                        {"filters": [f.model_dump(mode="json", by_alias=True) for f in config.filters]})
    checks = [(spec, build_check(spec)) for spec in config.filters]  # FilterError before any work
    if manifest := up_to_date(workdir, record):
        echo(f"filter: up to date ({manifest['counts']['kept']} kept in {workdir.uri_of(STEP)}); nothing to do")
        return manifest
    t0 = time.perf_counter()
    workdir.remove(STEP, "manifest.json")
    table = workdir.read_table("teacher", "answers")
    rows = table.to_pylist()
    reasons: list[str | None] = [f"teacher_error: {r['error_kind']}" if r.get("error") else None for r in rows]
    for spec, check in checks:
        if isinstance(spec, AgreementFilter):
            live = [i for i, reason in enumerate(reasons) if reason is None]
            verdicts = agreement_reasons([rows[i] for i in live], spec)
            for j, reason in verdicts.items():
                reasons[live[j]] = reason
            continue
        for i, row in enumerate(rows):
            if reasons[i] is None:
                reasons[i] = check(row)
    kept = [reason is None for reason in reasons]
    out = table.append_column("kept", pa.array(kept, pa.bool_())).append_column(
        "drop_reason", pa.array(reasons, pa.string()))
    workdir.write_table(out, STEP, "rows")

    by_reason: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, reason in zip(rows, reasons, strict=True):
        if reason is None:
            continue
        kind = reason.split(":")[0]
        by_reason[kind] += 1
        if len(examples[kind]) < EXAMPLES_PER_REASON:
            examples[kind].append({"id": row["id"], "teacher": row["teacher"], "completion": row.get("completion"),
                                   "reference": row.get("reference"), "reason": reason})
    splits = Counter((row["split"], k) for row, k in zip(rows, kept, strict=True))
    report = {
        "rows": len(rows), "kept": sum(kept), "dropped": len(rows) - sum(kept),
        "kept_by_split": {s: splits[(s, True)] for s in ("train", "holdout")},
        "dropped_by_reason": dict(by_reason.most_common()), "examples": dict(examples),
        "kept_by_category": dict(Counter(r["category"] for r, k in zip(rows, kept, strict=True) if k)),
        "filters": [f.model_dump(mode="json", by_alias=True) for f in config.filters],
    }
    workdir.write_json(report, STEP, "report.json")
    record.counts = {k: report[k] for k in ("rows", "kept", "dropped", "dropped_by_reason", "kept_by_split")}
    record.timings = {"total": time.perf_counter() - t0}
    manifest = write_manifest(workdir, record)
    echo(summary(report, workdir.uri_of(STEP)))
    return manifest


def summary(report: dict[str, Any], where: str) -> str:
    lines = [f"filter: kept {report['kept']} of {report['rows']} teacher answers "
             f"(train {report['kept_by_split']['train']}, holdout {report['kept_by_split']['holdout']}) in {where}"]
    for reason, count in report["dropped_by_reason"].items():
        example = report["examples"][reason][0]
        lines.append(f"  dropped {count:>5} {reason:<18} e.g. {example['reason']!r} "
                     f"(answer {example['completion']!r}, reference {example['reference']!r})")
    return "\n".join(lines)
