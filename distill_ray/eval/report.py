"""`eval/report.html`: one self-contained page (inline SVG, no script, no server, no network) that
reads as a decision: on top, which student to ship and why (or that none passes, and by how much
each misses the bar), the teacher and the students side by side; then a section per student,
passing ones first: slices, calibration with the recommended threshold, latency and cost, the bar,
and the worst disagreements with the prompt and both answers."""

from __future__ import annotations

import html
import unicodedata
from typing import Any

from distill_ray.eval.charts import calibration, slice_bars
from distill_ray.eval.decision import (
    confidence_decimals,
    fallback_text,
    ms,
    parameters,
    ranked,
    ship_choice,
    shortfalls,
    threshold_text,
    usd,
    worst_slice,
)

WORST_SHOWN = 10  # disagreements per student on the page (all are in eval/disagreements.jsonl)
TEXT_SHOWN = 400  # characters of a prompt or answer in a table cell (the cell's tooltip has it all)

STYLE = """
body{font-family:sans-serif;max-width:66em;margin:2em auto;padding:0 1em;color:#1a202c}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #cbd5e0;padding:3px 8px;font-size:13px;
vertical-align:top;text-align:left}th{background:#f7fafc}td.num{text-align:right;white-space:nowrap}
.decision{border:2px solid #2f855a;background:#f0fff4;padding:.6em 1em;border-radius:6px}
.decision.none{border-color:#c53030;background:#fff5f5}.decision-line{font-size:18px;font-weight:bold;margin:.2em 0}
.miss{color:#c53030;font-weight:bold}.verdict{font-size:13px;padding:1px 6px;border-radius:4px;color:#fff}
.verdict.ship{background:#2f855a}.verdict.pass{background:#4a5568}.verdict.fail{background:#c53030}
.text{max-width:28em;white-space:pre-wrap;word-break:break-word}.muted{color:#718096;font-size:12px}
.side-by-side td.num{text-align:left}section.student{border-top:1px solid #cbd5e0;margin-top:2em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _text(value: str | None) -> str:
    """A prompt or answer as a cell: control characters shown as U+FFFD, long text cut (in full on hover)."""
    if value is None:
        return '<td class="text muted">(none)</td>'
    clean = "".join(c if c in "\n\t" or unicodedata.category(c)[0] != "C" else "\ufffd" for c in value)
    shown = clean if len(clean) <= TEXT_SHOWN else clean[:TEXT_SHOWN] + "…"
    return f'<td class="text" title="{_e(clean)}">{_e(shown) if shown.strip() else "<i>(empty)</i>"}</td>'


def _table(cls: str, headers: list[str], rows: list[list[str]]) -> str:
    """A table; cells are HTML already (escape with `_e`), a row's first cell a <th> when `rows` say so."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if c.startswith("<t") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _failed(result: dict[str, Any], item: str, text: str) -> str:
    """A figure, marked when the student failed that item of the bar."""
    missed = any(g["passed"] is False and g["item"] == item for g in result["gate"])
    return f'<td class="num{" miss" if missed else ""}">{text}</td>'


def _badge(name: str, result: dict[str, Any], choice: str | None) -> str:
    kind = "ship" if name == choice else "pass" if result["passed"] else "fail"
    return f'<span class="verdict {kind}">{ {"ship": "SHIP", "pass": "PASS", "fail": "FAIL"}[kind]}</span>'


def _decision(report: dict[str, Any], order: list[str], choice: str | None) -> str:
    """The verdict on top: which student to ship and why, or that none passes and what each missed."""
    students, bar, teacher = report["students"], report["bar"], report["teacher"]
    if choice is None:
        misses = "".join(f"<li><b>{_e(n)}</b>: {_e('; '.join(shortfalls(students[n])))}</li>" for n in order)
        return (f'<div class="decision none"><p class="decision-line">No student meets the bar: ship none '
                f'(the teacher keeps answering).</p><ul>{misses}</ul></div>')
    r = students[choice]
    worst = worst_slice(r, bar["min_slice_holdout_rows"])
    passing = sum(1 for s in students.values() if s["passed"])
    why = [f"relative quality {r['quality']['overall']['relative_quality']:.2f} (bar ≥ {bar['min_relative_quality']:.2f})"]
    if worst:
        why.append(f"worst slice {worst[0]} {worst[1]['relative_quality']:.2f} "
                   f"(bar ≥ {bar['min_slice_relative_quality']:.2f})")
    cost = f"{usd(r['cost_per_1k_requests_usd'])} per 1k requests"
    if teacher.get("cost_per_1k_requests_usd"):
        cost += f" against the teacher's {usd(teacher['cost_per_1k_requests_usd'])}"
    why += [f"p95 {ms(r['latency']['p95_latency_ms'])} (bar ≤ {ms(bar['max_p95_latency_ms'])})",
            f"{cost} (bar ≤ {usd(bar['max_cost_per_1k_requests_usd'])})"]
    which = "the only student that does" if passing == 1 else \
        f"the smallest of the {passing} that do ({parameters(r['parameters'])} parameters)"
    failing = [n for n in order if not students[n]["passed"]]
    others = "".join(f"<li><b>{_e(n)}</b> fails: {_e('; '.join(shortfalls(students[n])))}</li>" for n in failing)
    return (f'<div class="decision"><p class="decision-line">Ship {_e(choice)}: it meets every item of the bar, '
            f'{_e(which)}.</p><p>{_e(", ".join(why))}. Recommended threshold: '
            f'{_e(threshold_text(r["threshold"], confidence_decimals(r["calibration"])))}.</p>{f"<ul>{others}</ul>" if others else ""}</div>')


def _side_by_side(report: dict[str, Any], order: list[str], choice: str | None) -> str:
    """Teacher and students in columns: quality, worst slice, p95, cost, fallback."""
    students, bar, teacher = report["students"], report["bar"], report["teacher"]
    first = students[order[0]]["quality"] if order else None
    t_slices = first["slices"] if first else {}
    t_worst = min(t_slices, key=lambda s: t_slices[s]["teacher"]) if t_slices else None
    rows = [
        ["<th>verdict</th>", "–"] + [_badge(n, students[n], choice) for n in order],
        ["<th>parameters</th>", "–"] + [parameters(students[n]["parameters"]) for n in order],
        ["<th>quality (mean score, 0 to 1)</th>", f"{first['overall']['teacher']:.2f}" if first else "–"]
        + [f"{students[n]['quality']['overall']['student']:.2f}" for n in order],
        ["<th>relative quality (student / teacher)</th>", "1.00"]
        + [_failed(students[n], "min_relative_quality", f"{students[n]['quality']['overall']['relative_quality']:.2f}")
           for n in order],
        ["<th>worst slice</th>",
         _e(f"{t_worst}: score {t_slices[t_worst]['teacher']:.2f}") if t_worst else "–"]
        + [_worst_cell(students[n], bar) for n in order],
        ["<th>p95 latency</th>", f'<td class="num">{ms(teacher.get("p95_latency_ms"))}</td>']
        + [_failed(students[n], "max_p95_latency_ms", ms(students[n]["latency"]["p95_latency_ms"])) for n in order],
        ["<th>cost per 1k requests</th>", f'<td class="num">{usd(teacher.get("cost_per_1k_requests_usd"))}</td>']
        + [_failed(students[n], "max_cost_per_1k_requests_usd", usd(students[n]["cost_per_1k_requests_usd"]))
           for n in order],
        ["<th>fallback to the teacher at the recommended threshold</th>", "–"]
        + [_e(fallback_text(students[n]["threshold"], confidence_decimals(students[n]["calibration"]))) for n in order],
    ]
    return _table("side-by-side", ["", "teacher"] + [_e(n) for n in order], rows) + (
        '<p class="muted">The teacher\'s p95 is its latency during generate\'s bulk calls (queueing included), its cost '
        "from usage × prices; a student's p95 is at batch 1 on its engine, its cost from eval.price_per_instance_hour_usd "
        "at the timed batch size.</p>")


def _worst_cell(result: dict[str, Any], bar: dict[str, Any]) -> str:
    worst = worst_slice(result, bar["min_slice_holdout_rows"])
    if worst is None:
        return "–"
    return _failed(result, f"min_slice_relative_quality[{worst[0]}]", _e(f"{worst[0]}: relative {worst[1]['relative_quality']:.2f}"))


def _student(name: str, report: dict[str, Any], disagreements: list[dict[str, Any]], choice: str | None) -> str:
    r = report["students"][name]
    q, t, latency = r["quality"], r["threshold"], r["latency"]
    decimals = confidence_decimals(r["calibration"])
    slice_rows = [[_e(s), f'<td class="num">{v["rows"]}</td>', f'<td class="num">{v["student"]:.2f}</td>',
                   f'<td class="num">{v["teacher"]:.2f}</td>',
                   _failed(r, f"min_slice_relative_quality[{s}]", f"{v['relative_quality']:.2f}"),
                   f'<td class="num">{v["agreement"]:.2f}</td>'] for s, v in q["slices"].items()]
    gate_rows = [[_e(g["item"]), f'<td class="num">{_bar_value(g["item"], g["value"])}</td>',
                  f'<td class="num">{("≤ " if g["item"].startswith("max") else "≥ ") + _bar_value(g["item"], g["bar"])}</td>',
                  {True: "pass", False: '<td class="miss">FAIL</td>', None: f"not judged ({g.get('rows')} rows)"}[g["passed"]]]
                 for g in r["gate"]]
    mine = sorted((d for d in disagreements if d["student"] == name),
                  key=lambda d: (d["student_score"] - d["teacher_score"], -(d["confidence"] or float("-inf")), d["id"]))
    served = t["min_confidence"] if t["meets_bar"] else None
    worst_rows = [[_e(d["category"]), _text(d.get("prompt")), _text(d["student_answer"]), _text(d["teacher_answer"]),
                   f'<td class="num">{d["confidence"]:.{decimals}f}</td>' if d["confidence"] is not None else "–",
                   _who_answers(d["confidence"], served, t["meets_bar"])] for d in mine[:WORST_SHOWN]]
    more = len(mine) - len(worst_rows)
    return f"""
<section class="student" id="student-{_e(name)}">
<h2>{_e(name)} {_badge(name, r, choice)}</h2>
<p>{parameters(r['parameters'])} parameters; relative quality {q['overall']['relative_quality']:.2f} (mean score
{q['overall']['student']:.2f} against the teacher's {q['overall']['teacher']:.2f}), agreement with the teacher
{q['overall']['agreement']:.2f}, on {q['overall']['rows']} holdout rows.{"" if r["passed"] else
 " Fails: " + _e("; ".join(shortfalls(r))) + "."}</p>
<h3>Per slice</h3>{slice_bars(q['slices'])}
{_table('slices', ['slice', 'rows', 'student', 'teacher', 'relative', 'agreement'], slice_rows)}
<h3>Calibration and the recommended threshold</h3>{calibration(r['calibration'], t)}
<p>Recommended threshold: {_e(threshold_text(t, decimals))}; the served mix's relative quality on the holdout:
{t['served']['overall']['relative_quality']:.2f}.</p>
<h3>Latency and cost</h3>
{_table('latency', ['', name], [
    ['<th>p50 latency (batch 1)</th>', f'<td class="num">{ms(latency["p50_latency_ms"])}</td>'],
    ['<th>p95 latency (batch 1)</th>', _failed(r, "max_p95_latency_ms", ms(latency["p95_latency_ms"]))],
    [f'<th>throughput at batch {latency["batch_size"]}</th>',
     f'<td class="num">{latency["requests_per_s_at_batch"]:,.1f} requests/s</td>'],
    ['<th>cost per 1k requests</th>', _failed(r, "max_cost_per_1k_requests_usd", usd(r["cost_per_1k_requests_usd"]))]])}
<h3>The bar</h3>{_table('gate', ['item', 'value', 'bar', 'verdict'], gate_rows)}
<h3>Worst disagreements with the teacher</h3>
{_table('disagreements', ['slice', 'prompt', 'student answer', 'teacher answer', 'confidence', 'at the threshold'],
        worst_rows) if worst_rows else '<p>None: the student agrees with the teacher on every holdout row.</p>'}
{f'<p class="muted">{more} more in eval/disagreements.jsonl.</p>' if more > 0 else ''}
</section>"""


def _bar_value(item: str, value: float) -> str:
    if item == "max_p95_latency_ms":
        return ms(value)
    if item == "max_cost_per_1k_requests_usd":
        return usd(value)
    return f"{value:.2f}"


def _who_answers(confidence: float | None, threshold: float | None, meets_bar: bool) -> str:
    """Whether a client would see this answer at the recommended threshold."""
    if not meets_bar or (threshold is not None and (confidence is None or confidence < threshold)):
        return "falls back"
    return '<td class="miss">served</td>'


def render(report: dict[str, Any], disagreements: list[dict[str, Any]]) -> str:
    """The page for eval's `metrics.json` (`report`) and its disagreement rows (with the prompt's text)."""
    order = ranked(report["students"])
    choice = ship_choice(report["students"])
    bar = report["bar"]
    sections = "".join(_student(n, report, disagreements, choice) for n in order)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill-ray evaluation</title><style>{STYLE}</style></head>
<body><h1>distill-ray evaluation</h1>
{_decision(report, order, choice)}
{_side_by_side(report, order, choice)}
<p class="muted">{report['holdout_rows']} holdout rows, metric <code>{_e(report['metric'])}</code>. The bar:
relative quality &ge; {bar['min_relative_quality']:.2f}, every slice with &ge; {bar['min_slice_holdout_rows']} rows
&ge; {bar['min_slice_relative_quality']:.2f}, p95 &le; {ms(bar['max_p95_latency_ms'])},
&le; {usd(bar['max_cost_per_1k_requests_usd'])} per 1k requests.</p>
{sections}
</body></html>
"""
