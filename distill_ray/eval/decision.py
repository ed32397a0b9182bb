"""What eval's figures decide: which student ships, its worst slice, and by how much a failing one
misses the bar; with the units the report and the summary print them in.

The rule for the student to ship: the smallest (fewest parameters) that passed every item of the bar,
the better relative quality breaking a tie. Functions here read a student's entry of
`eval/metrics.json` (`distill_ray.eval.step`) and print nothing.
"""

from __future__ import annotations

import math
from typing import Any


def ship_choice(students: dict[str, dict[str, Any]]) -> str | None:
    """The student to ship: the smallest that passed, the better relative quality breaking a tie; None
    when none passed."""
    passed = [r for r in students.values() if r["passed"]]
    if not passed:
        return None
    return min(passed, key=lambda r: (r["parameters"], -r["quality"]["overall"]["relative_quality"]))["student"]


def ranked(students: dict[str, dict[str, Any]]) -> list[str]:
    """Students in the order a reader weighs them: the one to ship, the other passing ones (smallest
    first), then the failing ones (best relative quality first)."""
    def key(r: dict[str, Any]) -> tuple:
        quality = r["quality"]["overall"]["relative_quality"]
        return (0, r["parameters"], -quality) if r["passed"] else (1, -quality, r["parameters"])

    choice = ship_choice(students)
    rest = sorted((r for n, r in students.items() if n != choice), key=key)
    return ([choice] if choice else []) + [r["student"] for r in rest]


def worst_slice(result: dict[str, Any], min_rows: int) -> tuple[str, dict[str, Any]] | None:
    """The slice with the lowest relative quality among those with `min_rows` holdout rows or more
    (all slices when none has that many); None without slices."""
    slices = result["quality"]["slices"]
    judged = {s: v for s, v in slices.items() if v["rows"] >= min_rows} or slices
    if not judged:
        return None
    name = min(judged, key=lambda s: judged[s]["relative_quality"])
    return name, judged[name]


def shortfalls(result: dict[str, Any]) -> list[str]:
    """Each failed item of the bar as a sentence: the value, the bar, and how far off it is."""
    out = []
    for item in result["gate"]:
        if item["passed"] is not False:
            continue
        name, value, bar = item["item"], item["value"], item["bar"]
        if name == "max_p95_latency_ms":
            out.append(f"p95 latency {ms(value)} against a bar of ≤ {ms(bar)} ({ms(value - bar)} over)")
        elif name == "max_cost_per_1k_requests_usd":
            out.append(f"cost {usd(value)} per 1k requests against a bar of ≤ {usd(bar)} ({usd(value - bar)} over)")
        else:  # min_relative_quality, min_slice_relative_quality[<slice>]
            where = f"slice {name.partition('[')[2].rstrip(']')}: " if "[" in name else ""
            out.append(f"{where}relative quality {value:.2f} against a bar of ≥ {bar:.2f} ({bar - value:.2f} short)")
    return out


def ms(value: float | None) -> str:
    """Milliseconds: one decimal under 10 ms, whole ones (with thousands separators) above."""
    if value is None:
        return "–"
    return f"{value:.1f} ms" if abs(value) < 10 else f"{value:,.0f} ms"


def usd(value: float | None) -> str:
    """Dollars with two significant digits under $1 ($0.00012, $0.0083, $0.47), cents above."""
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    digits = max(2, 1 - math.floor(math.log10(abs(value))))
    return f"${value:.{digits}f}"


def percent(value: float) -> str:
    """A rate as a whole percentage; '<1%' and '>99%' rather than a misleading 0% or 100%."""
    if 0 < value < 0.01:
        return "<1%"
    if 0.99 < value < 1:
        return ">99%"
    return f"{value:.0%}"


def parameters(count: int) -> str:
    """A parameter count: 194K, 135M, 1.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def threshold_text(threshold: dict[str, Any], decimals: int = 2) -> str:
    """The recommended `serve.min_confidence` and the fallback it gives, as a sentence's words."""
    fallback = percent(threshold["served"]["overall"]["fallback_rate"])
    if not threshold["meets_bar"]:
        return f"no threshold meets the bar: {fallback} of requests fall back to the teacher"
    if threshold["min_confidence"] is None:
        return "none needed: the student answers every request"
    return (f"serve.min_confidence {threshold['min_confidence']:.{decimals}f}: {fallback} of requests fall back "
            "to the teacher")


def fallback_text(threshold: dict[str, Any], decimals: int = 2) -> str:
    """The fallback rate at the recommended threshold, and that threshold, in a table cell's words."""
    fallback = percent(threshold["served"]["overall"]["fallback_rate"])
    if not threshold["meets_bar"]:
        return f"{fallback} (no threshold meets the bar)"
    if threshold["min_confidence"] is None:
        return f"{fallback} (no threshold needed)"
    return f"{fallback} (serve.min_confidence {threshold['min_confidence']:.{decimals}f})"


def confidence_decimals(buckets: list[dict[str, Any]]) -> int:
    """Decimals that tell a student's confidences apart (mean token logprobs, printed with an ASCII
    minus: a threshold is copied into YAML): two, or more where its answers' confidences lie close
    together (an untrained model's all near -5.43)."""
    values = [v for b in buckets for v in (b["min_confidence"], b["max_confidence"])]
    span = (max(values) - min(values)) / 8 if values else 0
    return max(2, min(6, 1 - math.floor(math.log10(span)))) if span > 0 else 2
