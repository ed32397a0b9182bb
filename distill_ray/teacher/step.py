"""Step 3a: every prompt (train and holdout) to every teacher, through Ray Data, paid for once.

Each prompt is sent as `chat.teacher_messages` builds it, `teacher.samples` times, by `ask.ask_teacher`
(a preflight call, then Ray Data workers or the Batch API, every answer cached durably as it arrives), so
a killed run resumes where it stopped and a finished run costs nothing to repeat. `teacher/answers` holds
one row per (prompt, teacher, sample); rows whose attempts failed carry `error` and are asked again on
the next run; the manifest then says `partial`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from distill_ray.chat import teacher_messages
from distill_ray.config.schema import PipelineConfig, Teacher
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.ray_env import init_ray
from distill_ray.storage import Workdir
from distill_ray.teacher.ask import ANSWER_SCHEMA, answer_row, ask_teacher
from distill_ray.teacher.cache import answer_key
from distill_ray.teacher.errors import BudgetReached, MissingInput, TeacherRejected
from distill_ray.teacher.ledger import read_spend, spend_by_step

STEP = "teacher"


def _load_prompts(workdir: Workdir) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    manifest = read_manifest(workdir, "prompts")
    if not manifest or manifest.get("status") != "complete":
        raise MissingInput(f"no complete prompt set in {workdir.uri_of('prompts')}: run `distill-ray prompts` first")
    rows = []
    for split in ("train", "holdout"):
        for row in workdir.read_table("prompts", split).to_pylist():
            rows.append({**row, "split": split})
    return rows, manifest


def run_generate(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate teacher answers; returns the manifest.

    Raises:
        MissingInput: no prompt set yet.
        TeacherRejected: a teacher refused the key, URL or model (nothing more is sent).
        BudgetReached: budget_usd stopped the step (resumable; exit 1).
    """
    workdir = Workdir(config.workdir)
    prompts, prompts_manifest = _load_prompts(workdir)
    record = StepRecord(STEP, {"prompts": prompts_manifest["fingerprint"]},
                        {"task": config.task.model_dump(mode="json"),
                         "teachers": [t.model_dump(mode="json") for t in config.teachers],
                         "budget_usd": config.budget_usd, "generate": config.generate.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        echo(f"generate: up to date ({manifest['counts']['answered']} answers in {workdir.uri_of(STEP)}); nothing to do")
        return manifest
    for teacher in config.teachers:
        if teacher.api_key_env and not os.environ.get(teacher.api_key_env):
            raise TeacherRejected(f"teachers.{teacher.name}.api_key_env: environment variable "
                                  f"{teacher.api_key_env} is not set")
    workdir.remove(STEP, "manifest.json")
    init_ray()
    t0 = time.perf_counter()
    rows_out: list[dict[str, Any]] = []
    report: dict[str, Any] = {"teachers": {}}
    stopped_by_budget = False
    for teacher in config.teachers:
        result = _generate_one(config, teacher, prompts, workdir, echo)
        rows_out.extend(result.pop("rows"))
        report["teachers"][teacher.name] = result
        stopped_by_budget |= result["errors_by_kind"].get("budget", 0) > 0

    workdir.write_table(pa.Table.from_pylist(rows_out, schema=ANSWER_SCHEMA), STEP, "answers")
    errors = Counter(r["error_kind"] for r in rows_out if r["error"])
    ledgers = {t.name: read_spend(workdir, t.name) for t in config.teachers}
    spent_all = sum(ledger["spent_usd"] for ledger in ledgers.values())
    report.update({
        "rows": len(rows_out), "answered": len(rows_out) - sum(errors.values()), "errors_by_kind": dict(errors),
        "spent_usd_total": round(sum(t["spent_usd_total"] for t in report["teachers"].values()), 6),
        "spent_usd_all_steps": round(spent_all, 6), "budget_usd": config.budget_usd,
        "spend_by_step": spend_by_step(workdir, [t.name for t in config.teachers]),
        "estimate_rest_usd": round(sum(t["estimate_rest_usd"] for t in report["teachers"].values()), 6),
    })
    workdir.write_json(report, STEP, "report.json")
    record.counts = {k: report[k] for k in ("rows", "answered", "errors_by_kind", "spent_usd_total")}
    record.timings = {"total": time.perf_counter() - t0}
    status = "partial" if errors else "complete"
    manifest = write_manifest(workdir, record, status)
    echo(summary(report, workdir.uri_of(STEP), status))
    if stopped_by_budget:
        raise BudgetReached(f"generate stopped at budget_usd={config.budget_usd}: ${spent_all:.4f} spent on the "
                            f"teachers by every step so far; {errors['budget']} answers not asked (about "
                            f"${report['estimate_rest_usd']:.4f} more). Raise budget_usd and run again to resume; "
                            "nothing paid for is asked again.")
    return manifest


def _generate_one(config: PipelineConfig, teacher: Teacher, prompts: list[dict[str, Any]], workdir: Workdir,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    work = []
    for prompt in prompts:
        messages = teacher_messages(config.task, prompt["messages"])
        for sample in range(teacher.samples):
            key = answer_key(teacher, messages, sample)
            work.append({"key": key, "sample": sample, "request": json.dumps(messages, ensure_ascii=False),
                         "prompt": prompt})
    asked = ask_teacher(teacher, work, workdir, config.generate, config.budget_usd, echo,
                        label=f"generate[{teacher.name}]", step="generate", limit=config.generate.limit,
                        other_teachers=[t.name for t in config.teachers if t.name != teacher.name],
                        mode=config.generate.mode)
    answers, results, nodes = asked["answers"], asked["results"], asked["nodes"]
    rows, errors = [], Counter()
    for w in work:
        row = answer_row(teacher, w, answers.get(w["key"]), results.get(w["key"]),
                         "not asked in this run (generate.limit, or the run stopped)")
        if row["error"] is not None:
            errors[row["error_kind"]] += 1
        rows.append(row)
    cached_spend = sum(a.get("cost_usd") or 0.0 for a in answers.values())
    mean_cost = cached_spend / len(answers) if answers else 0.0
    return {
        "rows": rows, "answers_needed": len(work), "cached_before": asked["cached_before"],
        "asked": len(results), "answered_now": sum(1 for r in results.values() if not r["error"]),
        "errors_by_kind": dict(errors), "spent_usd_this_run": round(asked["spent_this_run"], 6),
        "spent_usd_total": round(asked["spent_step_total"], 6),
        "estimate_rest_usd": round(mean_cost * sum(errors.values()), 6), "calls_by_node": dict(nodes),
        "ledger": asked["ledger"], **({"batch": asked["batch"]} if asked.get("batch") else {}),
    }


def summary(report: dict[str, Any], where: str, status: str) -> str:
    budget = f" of budget_usd {report['budget_usd']:g}" if report.get("budget_usd") is not None else ""
    lines = [f"generate: {report['answered']}/{report['rows']} answers in {where} ({status}); "
             f"spent ${report['spent_usd_total']:.4f} on generating in all; "
             f"${report['spent_usd_all_steps']:.4f} on the teachers by every step{budget}"]
    for name, t in report["teachers"].items():
        by_step = report["spend_by_step"].get(name) or {}
        ledger = t.get("ledger") or {}
        lines.append(f"  {name}: asked {t['asked']}, answered now {t['answered_now']}, cached before "
                     f"{t['cached_before']}, this run ${t['spent_usd_this_run']:.4f}, errors {t['errors_by_kind'] or 0}"
                     + (f", calls by node {t['calls_by_node']}" if t["calls_by_node"] else "")
                     + (", spend by step " + ", ".join(f"{k} ${v:.4f}" for k, v in by_step.items()) if by_step else "")
                     + (f"; {ledger['reclaimed']} answer keys claimed again after their worker died (sent by "
                        "it or not)"
                        if ledger.get("reclaimed") else ""))
    if report["errors_by_kind"]:
        lines.append(f"  rows with errors are asked again on the next run: {report['errors_by_kind']}")
    return "\n".join(lines)
