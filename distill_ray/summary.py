"""The distillation summary `distill-ray run` ends with: teacher and students side by side.

Per model: quality (mean score on the holdout, against references where the log had them, else
the teacher's answers), relative quality, the worst slice's relative quality, p95 latency, cost
per 1k requests, the fallback rate at the recommended threshold, and pass/fail against `task.bar`;
then what serving and drift found, and where the report, checkpoints and logs are.
"""

from __future__ import annotations

import json
from typing import Any

from distill_ray.config.schema import PipelineConfig
from distill_ray.eval.decision import worst_slice
from distill_ray.storage import Workdir


def _read(workdir: Workdir, *parts: str) -> dict[str, Any] | None:
    return json.loads(workdir.read_bytes(*parts)) if workdir.exists(*parts) else None


def summary(config: PipelineConfig) -> str | None:
    workdir = Workdir(config.workdir)
    metrics = _read(workdir, "eval", "metrics.json")
    if not metrics:
        return None
    bar = config.task.bar
    teacher = metrics["teacher"]
    students = metrics["students"]
    any_result = next(iter(students.values()), None)
    head = (f"{'model':<22} {'params':>7} {'quality':>8} {'relative':>8} {'worst slice':>22} {'p95 ms':>8} "
            f"{'$/1k req':>9} {'fallback':>9} {'bar':>5}")
    lines = [f"distillation summary: {config.name} ({metrics['holdout_rows']} held-out prompts, metric "
             f"{metrics['metric']}; bar: relative >= {bar.min_relative_quality}, every slice >= "
             f"{bar.min_slice_relative_quality}, p95 <= {bar.max_p95_latency_ms:g} ms, <= "
             f"${bar.max_cost_per_1k_requests_usd}/1k)", head, "-" * len(head)]
    if any_result:
        t_quality = any_result["quality"]["overall"]["teacher"]
        lines.append(f"{'teacher ' + config.reference_teacher.name:<22} {'-':>7} {t_quality:>8.3f} {1.0:>8.3f} {'-':>22} "
                     f"{_num(teacher.get('p95_latency_ms'), 8, 0)} {_num(teacher.get('cost_per_1k_requests_usd'), 9, 4)} "
                     f"{'-':>9} {'-':>5}")
    for name, r in students.items():
        q = r["quality"]
        worst = worst_slice(r, bar.min_slice_holdout_rows)
        worst_text = f"{worst[0]} {worst[1]['relative_quality']:.3f}" if worst else "-"
        fallback = r["threshold"]["served"]["overall"]["fallback_rate"]
        lines.append(f"{'student ' + name:<22} {r['parameters'] / 1e6:>6.1f}M {q['overall']['student']:>8.3f} "
                     f"{q['overall']['relative_quality']:>8.3f} {worst_text:>22} "
                     f"{_num(r['latency']['p95_latency_ms'], 8, 0)} {_num(r['cost_per_1k_requests_usd'], 9, 4)} "
                     f"{fallback:>9.1%} {'PASS' if r['passed'] else 'FAIL':>5}")
        if not r["passed"]:
            lines.append(f"{'':<22}   fails: {', '.join(r['failed'])}")
    lines.append("(the teacher's p95 is its latency during generate's bulk calls, queueing included; its cost is "
                 "from usage x prices)")
    replay = _read(workdir, "serve", "replay.json")
    if replay:
        for phase, p in replay["phases"].items():
            lines.append(f"serve[{phase}] student {replay['student']}: {p['requests']} requests, served by "
                         + ", ".join(f"{k} {v}" for k, v in sorted(p["served_by"].items()))
                         + (f", fallbacks {p['fallbacks']}" if p["fallbacks"] else "")
                         + f", served quality {p['served_quality']}, p95 {p['p95_ms']} ms, {p['errors']} errors")
    from distill_ray.teacher.ledger import spend_by_step

    for name, steps in spend_by_step(workdir, [t.name for t in config.teachers]).items():
        if steps:
            lines.append(f"teacher {name} spend: " + ", ".join(f"{step} ${usd:.4f}" for step, usd in steps.items())
                         + f" (${sum(steps.values()):.4f} in all"
                         + (f" of budget_usd {config.budget_usd:g})" if config.budget_usd is not None else ")"))
    drift = _read(workdir, "drift", "report.json")
    if drift:
        lines.append(f"drift: {drift['verdict']}" + (f" ({'; '.join(drift['reasons'])})" if drift["reasons"] else ""))
    from distill_ray.flywheel.step import round_workdir, rounds

    done = [n for n in rounds(workdir) if round_workdir(workdir, n).exists("report.json")]
    if done:
        last = json.loads(round_workdir(workdir, done[-1]).read_bytes("report.json"))
        q = last["quality"]
        lines.append(f"flywheel: round {done[-1]}: {last['new']['student']} {q['new']:.3f} against the served "
                     f"{last['current']['student']} {q['current']:.3f} on served traffic: "
                     + ("promoted" if last["promoted"] else "kept the served student"))
    lines += [f"report:      {workdir.uri_of('eval', 'report.html')}",
              "checkpoints: " + ", ".join(workdir.uri_of("students", s.name, "best") for s in config.students),
              f"serve logs:  {workdir.uri_of('serve', 'logs')}"]
    return "\n".join(lines)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
