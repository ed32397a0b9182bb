"""eval's report.html built from a hand-made metrics.json (no Ray, no engine): what a reader sees on
top, the order of the students, the units, the threshold on the chart, the disagreements' text."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from distill_ray.eval.decision import ship_choice, usd
from distill_ray.eval.report import render

BAR = {"min_relative_quality": 0.9, "min_slice_relative_quality": 0.8, "max_p95_latency_ms": 500.0,
       "max_cost_per_1k_requests_usd": 0.1, "min_slice_holdout_rows": 5}


def _slice(rows: int, student: float, teacher: float = 1.0, fallback: float = 0.0) -> dict:
    return {"rows": rows, "student": student, "teacher": teacher, "relative_quality": round(student / teacher, 4),
            "agreement": student, "fallback_rate": fallback}


def _student(name: str, params: int, refund: float, shipping: float, p95: float, cost: float,
             threshold: float | None, meets: bool, fallback: float) -> dict:
    slices = {"refund": _slice(20, refund), "shipping": _slice(30, shipping)}
    overall = _slice(50, (20 * refund + 30 * shipping) / 50)
    gate = [{"item": "min_relative_quality", "value": overall["relative_quality"], "bar": 0.9,
             "passed": overall["relative_quality"] >= 0.9},
            {"item": "max_p95_latency_ms", "value": p95, "bar": 500.0, "passed": p95 <= 500},
            {"item": "max_cost_per_1k_requests_usd", "value": cost, "bar": 0.1, "passed": cost <= 0.1}]
    gate += [{"item": f"min_slice_relative_quality[{s}]", "value": v["relative_quality"], "bar": 0.8, "rows": v["rows"],
              "passed": v["relative_quality"] >= 0.8} for s, v in slices.items()]
    failed = [g["item"] for g in gate if g["passed"] is False]
    calibration = [{"min_confidence": lo, "max_confidence": lo + 0.1, "rows": 10, "agreement": a, "student_score": a}
                   for lo, a in ((-1.2, 0.4), (-0.9, 0.7), (-0.6, 0.9), (-0.4, 1.0), (-0.2, 1.0))]
    return {"student": name, "checkpoint": f"/w/students/{name}/best", "parameters": params,
            "quality": {"overall": overall, "slices": slices}, "calibration": calibration,
            "threshold": {"min_confidence": threshold, "meets_bar": meets,
                          "served": {"overall": {**overall, "fallback_rate": fallback}, "slices": slices}},
            "latency": {"p50_latency_ms": p95 / 2, "p95_latency_ms": p95, "requests_per_s_at_batch": 41.37,
                        "batch_size": 8},
            "cost_per_1k_requests_usd": cost, "gate": gate, "passed": not failed, "failed": failed}


def _report(*students: dict) -> dict:
    return {"holdout_rows": 50, "holdout_rows_without_trusted_target": 0, "metric": "exact_match", "bar": BAR,
            "teacher": {"cost_per_1k_requests_usd": 0.4652, "p95_latency_ms": 1834.27},
            "students": {s["student"]: s for s in students}}


# A failing student listed first in the config, a passing one after it.
TINY = _student("tiny", 30_000_000, refund=0.55, shipping=0.9, p95=612.4, cost=0.0123, threshold=None, meets=False,
                fallback=1.0)
SMALL = _student("small", 135_000_000, refund=0.85, shipping=1.0, p95=87.25, cost=0.00834, threshold=-0.7153,
                 meets=True, fallback=0.3)
DISAGREEMENTS = [
    {"student": "small", "id": "a1", "category": "refund", "prompt": "Where is my refund for <order> ORD-100017?",
     "student_answer": "ORD-100071", "teacher_answer": "ORD-100017", "confidence": -0.31,
     "student_score": 0.0, "teacher_score": 1.0},
    {"student": "tiny", "id": "b2", "category": "refund", "prompt": "Refund ORD-100020 please",
     "student_answer": "\x19 parcel", "teacher_answer": "ORD-100020", "confidence": -1.1,
     "student_score": 0.0, "teacher_score": 1.0},
]


class _Page(HTMLParser):
    """The page's text in reading order, with the classes of the elements each piece of text is in."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.pieces: list[tuple[str, str]] = []  # (classes of the open elements, text)
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in ("br", "line", "rect", "circle", "meta", "polyline"):
            self.stack.append(attrs.get("class") or tag)

    def handle_endtag(self, tag):
        if tag not in ("br", "line", "rect", "circle", "meta", "polyline") and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if data.strip():
            self.pieces.append((" ".join(self.stack), data.strip()))

    def text(self, inside: str = "") -> str:
        return " ".join(t for where, t in self.pieces if inside in where.split())


def _parse(report: dict, disagreements: list[dict]) -> _Page:
    page = _Page()
    page.feed(render(report, disagreements))
    return page


def test_the_passing_student_is_recommended_on_top_beside_the_teacher():
    page = _parse(_report(TINY, SMALL), DISAGREEMENTS)
    decision = page.text("decision-line")
    assert decision.startswith("Ship small: it meets every item of the bar, the only student that does")
    # On top: the decision right under the title, then the side-by-side table, then the students' sections.
    tops = [a.get("class") or tag for tag, a in page.elements if tag in ("h1", "div", "table", "section")]
    assert tops[:3] == ["h1", "decision", "side-by-side"] and tops.index("student") > 2
    why = page.text("decision")
    # The reasons, rounded and with units; the failing student's shortfalls beside it.
    assert "relative quality 0.94 (bar ≥ 0.90)" in why and "worst slice refund 0.85 (bar ≥ 0.80)" in why
    assert "p95 87 ms (bar ≤ 500 ms)" in why and "$0.0083 per 1k requests against the teacher's $0.47 (bar ≤ $0.10)" in why
    assert "threshold: serve.min_confidence -0.72: 30% of requests fall back to the teacher" in why
    assert "tiny fails: relative quality 0.76 against a bar of ≥ 0.90 (0.14 short)" in why
    assert "p95 latency 612 ms against a bar of ≤ 500 ms (112 ms over)" in why
    assert "slice refund: relative quality 0.55 against a bar of ≥ 0.80 (0.25 short)" in why

    # Side by side: teacher, then the passing student, then the failing one; the teacher's own figures.
    table = page.text("side-by-side")
    assert table.index("teacher") < table.index("small") < table.index("tiny")
    assert "1,834 ms" in table and "$0.47" in table and "87 ms" in table and "612 ms" in table
    assert "refund: score 1.00" in table and "refund: relative 0.85" in table and "refund: relative 0.55" in table
    assert "SHIP" in table and "FAIL" in table and "135M" in table and "30M" in table
    # Sections in the same order: the passing student before the failing one.
    ids = [a["id"] for tag, a in page.elements if tag == "section"]
    assert ids == ["student-small", "student-tiny"]


def test_the_calibration_chart_has_labelled_axes_and_the_threshold_marked():
    page = _parse(_report(TINY, SMALL), DISAGREEMENTS)
    html = render(_report(TINY, SMALL), DISAGREEMENTS)
    small, tiny = html.split('id="student-tiny"')
    assert small.count('class="threshold"') == 1 and 'class="fallback-zone"' in small
    assert "serve.min_confidence -0.72: 30% fall back (shaded)" in small
    assert "student confidence (mean token logprob of its answer)" in small and "agreement with the teacher" in small
    # The line stands where -0.7153 falls on the axis between its ticks.
    line = re.search(r'class="threshold" x1="([\d.]+)"', small)
    ticks = {float(t): float(x) for x, t in re.findall(r'<text x="([\d.]+)" y="\d+" font-size="10" '
                                                         r'text-anchor="middle">(-[\d.]+)</text>', small)}
    below = max(t for t in ticks if t <= -0.7153)
    above = min(t for t in ticks if t >= -0.7153)
    assert ticks[below] <= float(line.group(1)) <= ticks[above]
    # The failing student has no threshold that meets the bar: the chart says so, no line.
    assert 'class="threshold"' not in tiny and "no threshold meets the bar: 100% fall back" in tiny
    assert page.text("axis-x").count("student confidence") == 2


def test_the_worst_disagreements_show_the_prompt_and_both_answers():
    page = _parse(_report(TINY, SMALL), DISAGREEMENTS)
    table = page.text("disagreements")
    assert "Where is my refund for <order> ORD-100017?" in table  # escaped in the HTML, read back as text
    assert "ORD-100071" in table and "ORD-100017" in table and "served" in table
    assert "\ufffd parcel" in table and "\x19" not in render(_report(TINY, SMALL), DISAGREEMENTS)
    assert "falls back" in table


def test_with_no_student_passing_the_top_says_so_and_what_failed():
    page = _parse(_report(TINY), DISAGREEMENTS)
    decision = page.text("decision")
    assert decision.startswith("No student meets the bar: ship none")
    assert "tiny" in decision and "relative quality 0.76 against a bar of ≥ 0.90 (0.14 short)" in decision
    assert "cost" not in decision  # $0.012 per 1k passes the bar of $0.10
    assert "Ship" not in page.text("decision-line")


def test_the_smallest_passing_student_ships_as_serve_picks_it():
    big = {**SMALL, "student": "big", "parameters": 360_000_000}
    assert ship_choice({"big": big, "small": SMALL, "tiny": TINY}) == "small"
    assert ship_choice({"tiny": TINY}) is None
    assert [usd(v) for v in (0.000118, 0.00834, 0.4652, 1.5, 0)] == ["$0.00012", "$0.0083", "$0.47", "$1.50", "$0.00"]


def test_close_confidences_are_printed_apart():
    """An untrained student's confidences all lie near -5.43: two decimals would print the threshold
    and every row as -5.42, served and falling back alike."""
    close = [{"min_confidence": -5.4564 + i * 0.008, "max_confidence": -5.4515 + i * 0.008, "rows": 2,
              "agreement": 0.0, "student_score": 0.0} for i in range(5)]
    student = {**SMALL, "calibration": close,
               "threshold": {**SMALL["threshold"], "min_confidence": -5.424215}}
    rows = [{**DISAGREEMENTS[0], "confidence": c} for c in (-5.42418, -5.42431)]
    page = _parse(_report(student), rows)
    assert "serve.min_confidence -5.4242: 30% of requests fall back" in page.text("decision")
    cells = page.text("disagreements")
    assert "-5.4242 served" in cells and "-5.4243 falls back" in cells
