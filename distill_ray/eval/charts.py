"""The report's two charts as inline SVG (no script): per-slice scores, and calibration with the
recommended threshold marked."""

from __future__ import annotations

import html
import math
from typing import Any

from distill_ray.eval.decision import confidence_decimals, percent

STUDENT, TEACHER, THRESHOLD = "#2b6cb0", "#a0aec0", "#c53030"


def slice_bars(slices: dict[str, Any]) -> str:
    """Per-slice mean scores (0 to 1), the teacher's bar above the student's."""
    left, width, row = 150, 440, 30
    rows = list(slices.items())
    height = row * len(rows) + 56
    axis_y = 10 + row * len(rows)
    parts = [f'<svg class="slice-bars" width="{left + width + 40}" height="{height}" role="img" '
             'aria-label="mean score per slice, teacher and student" font-family="sans-serif">']
    for i, (name, s) in enumerate(rows):
        y = 10 + i * row
        parts.append(f'<text x="{left - 8}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
        for j, (who, color) in enumerate((("teacher", TEACHER), ("student", STUDENT))):
            w = max(0.0, min(1.0, s[who])) * width
            parts.append(f'<rect class="bar-{who}" x="{left}" y="{y + j * 11}" width="{w:.1f}" height="10" '
                         f'fill="{color}"><title>{html.escape(name)}: {who} {s[who]:.2f}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + j * 11 + 9}" font-size="9">{s[who]:.2f}</text>')
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" stroke="#333"/>')
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = left + tick * width
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#333"/>'
                     f'<text x="{x:.1f}" y="{axis_y + 16}" font-size="10" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{axis_y + 32}" font-size="11" text-anchor="middle">mean score '
                 f'(0 to 1): <tspan fill="#718096">■ teacher</tspan> <tspan fill="{STUDENT}">■ student</tspan></text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float) -> tuple[list[float], int]:
    """Round ticks (steps of 1, 2 or 5 times a power of ten, 4 to 8 of them) over [lo, hi], and the
    decimals that print them."""
    raw = (hi - lo) / 8
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [k * step + 0.0 for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def calibration(buckets: list[dict[str, Any]], threshold: dict[str, Any]) -> str:
    """Agreement with the teacher per confidence bucket, on a confidence axis, with the recommended
    `serve.min_confidence` drawn as a line (answers left of it fall back to the teacher)."""
    if not buckets:
        return "<p>No confidences recorded: no calibration, no threshold.</p>"
    w, h, left, right, top, bottom = 600, 260, 64, 24, 34, 52
    chosen = threshold["min_confidence"] if threshold["meets_bar"] else None
    values = [b["min_confidence"] for b in buckets] + [b["max_confidence"] for b in buckets]
    values += [chosen] if chosen is not None else []
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.5
    lo, hi = lo - pad, hi + pad

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (w - left - right)

    def y(v: float) -> float:
        return h - bottom - v * (h - top - bottom)

    parts = [f'<svg class="calibration" width="{w}" height="{h}" role="img" font-family="sans-serif" '
             'aria-label="agreement with the teacher by the student\'s confidence, with the recommended threshold">']
    if chosen is not None:  # the fallback zone: answers below the threshold go to the teacher
        parts.append(f'<rect class="fallback-zone" x="{left}" y="{top}" width="{x(chosen) - left:.1f}" '
                     f'height="{h - top - bottom}" fill="#fed7d7" opacity="0.5"/>')
    for v in (0, 0.5, 1):
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{w - right}" y2="{y(v):.1f}" stroke="#e2e8f0"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{v:g}</text>')
    parts.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#333"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#333"/>')
    ticks, decimals = _ticks(lo, hi)
    shown = confidence_decimals(buckets)  # a bucket's or the threshold's confidence, as the report prints them
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{h - bottom}" x2="{x(t):.1f}" y2="{h - bottom + 4}" stroke="#333"/>'
                     f'<text x="{x(t):.1f}" y="{h - bottom + 16}" font-size="10" text-anchor="middle">'
                     f'{t:.{decimals}f}</text>')
    parts.append(f'<text class="axis-x" x="{(left + w - right) / 2}" y="{h - 10}" font-size="11" '
                 'text-anchor="middle">student confidence (mean token logprob of its answer)</text>'
                 f'<text class="axis-y" x="14" y="{(top + h - bottom) / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + h - bottom) / 2})">agreement with the teacher</text>')
    points = [(x((b["min_confidence"] + b["max_confidence"]) / 2), y(b["agreement"])) for b in buckets]
    if len(points) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{STUDENT}" stroke-width="2"/>')
    for (px, py), b in zip(points, buckets, strict=True):
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{STUDENT}"><title>confidence '
                     f'{b["min_confidence"]:.{shown}f} to {b["max_confidence"]:.{shown}f}: agreement '
                     f'{b["agreement"]:.2f} ({b["rows"]} rows)</title></circle>')
    fallback = percent(threshold["served"]["overall"]["fallback_rate"])
    if chosen is not None:
        parts.append(f'<line class="threshold" x1="{x(chosen):.1f}" y1="{top - 6}" x2="{x(chosen):.1f}" '
                     f'y2="{h - bottom}" stroke="{THRESHOLD}" stroke-width="2" stroke-dasharray="5,3"/>')
        anchor = "start" if x(chosen) < w / 2 else "end"
        shift = 4 if anchor == "start" else -4
        parts.append(f'<text class="threshold-label" x="{x(chosen) + shift:.1f}" y="{top - 10}" font-size="11" '
                     f'fill="{THRESHOLD}" text-anchor="{anchor}">serve.min_confidence {chosen:.{shown}f}: '
                     f'{fallback} fall back (shaded)</text>')
    else:
        words = ("no threshold needed: the student answers every request" if threshold["meets_bar"]
                 else f"no threshold meets the bar: {fallback} fall back")
        parts.append(f'<text class="threshold-label" x="{w - right}" y="{top - 10}" font-size="11" '
                     f'fill="{THRESHOLD}" text-anchor="end">{words}</text>')
    parts.append("</svg>")
    return "".join(parts)
