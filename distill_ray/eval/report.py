"""`eval/report.html`: one self-contained page (inline SVG, no script, no server, no network)."""

from __future__ import annotations

import html
from typing import Any

WIDTH = 520


def _bars(slices: dict[str, Any]) -> str:
    """Per-slice bars, student vs teacher score."""
    rows = list(slices.items())
    height = 28 * len(rows) + 30
    parts = [f'<svg class="slice-bars" width="{WIDTH + 180}" height="{height}" role="img" '
             'aria-label="per-slice scores, student vs teacher">']
    for i, (name, s) in enumerate(rows):
        y = 10 + i * 28
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(name)}</text>')
        for j, (who, color) in enumerate((("teacher", "#999"), ("student", "#2b6cb0"))):
            w = max(0.0, min(1.0, s[who])) * WIDTH
            parts.append(f'<rect class="bar-{who}" x="160" y="{y + j * 11}" width="{w:.1f}" height="10" '
                         f'fill="{color}"><title>{who} {s[who]:.3f}</title></rect>')
    parts.append(f'<text x="160" y="{height - 4}" font-size="11">grey: teacher, blue: student (score 0 to 1)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _calibration(buckets: list[dict[str, Any]]) -> str:
    """Agreement with the teacher by confidence bucket, as a line."""
    if not buckets:
        return "<p>No confidences recorded.</p>"
    h, w = 200, WIDTH
    n = len(buckets)
    points = [(40 + (i + 0.5) * (w - 60) / n, h - 30 - b["agreement"] * (h - 50)) for i, b in enumerate(buckets)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    parts = [f'<svg class="calibration" width="{w}" height="{h}" role="img" aria-label="calibration curve">',
             f'<line x1="40" y1="{h - 30}" x2="{w - 20}" y2="{h - 30}" stroke="#333"/>',
             f'<line x1="40" y1="20" x2="40" y2="{h - 30}" stroke="#333"/>',
             f'<polyline points="{path}" fill="none" stroke="#2b6cb0" stroke-width="2"/>']
    for (x, y), b in zip(points, buckets, strict=True):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#2b6cb0"><title>confidence '
                     f'{b["min_confidence"]}..{b["max_confidence"]}: agreement {b["agreement"]} ({b["rows"]} rows)'
                     '</title></circle>')
        parts.append(f'<text x="{x - 12:.1f}" y="{h - 12}" font-size="10">{b["max_confidence"]:.2f}</text>')
    parts.append('<text x="0" y="16" font-size="10">agreement</text></svg>')
    return "".join(parts)


def _table(headers: list[str], rows: list[list[Any]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(report: dict[str, Any], disagreements: list[dict[str, Any]]) -> str:
    sections = []
    for name, r in report["students"].items():
        q = r["quality"]
        verdict = "PASS" if r["passed"] else "FAIL: " + ", ".join(r["failed"])
        slice_rows = [[s, v["rows"], f"{v['student']:.3f}", f"{v['teacher']:.3f}", f"{v['relative_quality']:.3f}",
                       f"{v['agreement']:.3f}"] for s, v in q["slices"].items()]
        gate_rows = [[g["item"], g["value"], g["bar"], {True: "pass", False: "FAIL", None: "too few rows"}[g["passed"]]]
                     for g in r["gate"]]
        t = r["threshold"]
        worst = [d for d in disagreements if d["student"] == name][:20]
        sections.append(f"""
<section class="student" id="student-{html.escape(name)}">
<h2>{html.escape(name)} <span class="verdict">{html.escape(verdict)}</span></h2>
<p>{r['parameters'] / 1e6:.1f}M parameters; relative quality {q['overall']['relative_quality']:.3f}
(student {q['overall']['student']:.3f} / teacher {q['overall']['teacher']:.3f}), agreement
{q['overall']['agreement']:.3f} on {q['overall']['rows']} holdout rows.</p>
<h3>Per slice</h3>{_bars(q['slices'])}
{_table(['slice', 'rows', 'student', 'teacher', 'relative', 'agreement'], slice_rows, 'slices')}
<h3>Calibration</h3>{_calibration(r['calibration'])}
<p>Recommended <code>serve.min_confidence</code>: {t['min_confidence']} — fallback
{t['served']['overall']['fallback_rate']:.1%}, served relative quality
{t['served']['overall']['relative_quality']:.3f}{'' if t['meets_bar'] else ' (no threshold meets the bar)'}.</p>
<h3>Latency and cost</h3>
{_table(['', 'student', 'teacher'], [
    ['p50 latency (ms, batch 1)', r['latency']['p50_latency_ms'], '-'],
    ['p95 latency (ms, batch 1)', r['latency']['p95_latency_ms'], report['teacher']['p95_latency_ms']],
    [f"requests/s at batch {r['latency']['batch_size']}", r['latency']['requests_per_s_at_batch'], '-'],
    ['cost per 1k requests (USD)', r['cost_per_1k_requests_usd'], report['teacher']['cost_per_1k_requests_usd']]],
    'latency')}
<h3>Gate</h3>{_table(['item', 'value', 'bar', 'verdict'], gate_rows, 'gate')}
<h3>Worst disagreements</h3>
{_table(['slice', 'id', 'student', 'teacher', 'confidence'], [[d['category'], d['id'], d['student_answer'],
        d['teacher_answer'], d['confidence']] for d in worst], 'disagreements')}
</section>""")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill-ray evaluation</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}.verdict{{font-size:14px}}</style></head>
<body><h1>distill-ray evaluation</h1>
<p>{report['holdout_rows']} holdout rows, metric <code>{html.escape(report['metric'])}</code>; bar: relative quality
&ge; {report['bar']['min_relative_quality']}, every slice &ge; {report['bar']['min_slice_relative_quality']},
p95 &le; {report['bar']['max_p95_latency_ms']} ms, &le; ${report['bar']['max_cost_per_1k_requests_usd']} per 1k
requests.</p>
{''.join(sections)}
</body></html>
"""
