"""The serve app's numbers: Ray's Prometheus export (`Metrics`) and each router replica's own
counters for `/v1/distill/stats` (`Stats`)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from typing import Any

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
# Prometheus histograms take positive bucket bounds: the confidence is exported negated (-mean logprob).
UNCERTAINTY_BOUNDARIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5]
AGREEMENT_BOUNDARIES = [0.25, 0.5, 0.75, 0.9, 0.99]
GAUGE_EVERY_S = 5.0  # Ray exports a gauge only for a while after it was set: set it again this often


class Metrics:
    """Ray's Prometheus export (scraped from every node's metrics agent). `category` is a bounded
    label: a known slice, `unknown` (none sent) or `other` (serve.categories)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter("distill_serve_requests_total", "Requests answered, by who answered and slice.",
                                        tag_keys=("served_by", "mode", "category"))
        self.fallbacks = metrics.Counter("distill_serve_fallbacks_total", "Student answers replaced by the teacher's.",
                                         tag_keys=("reason", "category"))
        self.student_requests = metrics.Counter(
            "distill_serve_student_requests_total", "Requests routed to the student (canary, full), by slice: the "
            "denominator of the fallback rate.", tag_keys=("category",))
        self.errors = metrics.Counter("distill_serve_errors_total", "Requests answered with an error.",
                                      tag_keys=("status",))
        self.confidence = metrics.Histogram("distill_serve_student_uncertainty",
                                            "Student confidence, negated: -(mean token logprob) of each answer.",
                                            boundaries=UNCERTAINTY_BOUNDARIES, tag_keys=("category",))
        self.latency = metrics.Histogram("distill_serve_latency_ms", "Request latency in ms, by who answered and slice.",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("served_by", "category"))
        # agreement per comparison (1.0: the same answer; partial for token_f1): _sum / _count is the mean
        self.shadow = metrics.Histogram("distill_serve_shadow_agreement", "Shadow comparisons: the student's agreement "
                                        "with the teacher's answer, by slice.", boundaries=AGREEMENT_BOUNDARIES,
                                        tag_keys=("category",))
        self.log_lines = metrics.Counter("distill_serve_log_lines_total", "Request log lines, by outcome.",
                                         tag_keys=("outcome",))
        self.canary = metrics.Gauge("distill_serve_rollout_percent",
                                    "Share of users the student answers (0 in shadow mode, 100 in full).")


class Stats:
    """This replica's counters for /v1/distill/stats (Prometheus has the cluster-wide series)."""

    def __init__(self):
        self.started = time.time()
        self.served_by: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=20000))
        self.shadow: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        # per slice: requests, routed to the student, fallbacks, latencies, student confidences
        self.slices: dict[str, dict[str, Any]] = defaultdict(lambda: {
            "requests": 0, "student_requests": 0, "fallbacks": 0, "latency": deque(maxlen=5000),
            "confidence": deque(maxlen=5000)})

    def snapshot(self) -> dict[str, Any]:
        def pct(values: list[float], p: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

        latency = {who: {"count": len(v), "p50_ms": pct(list(v), 50), "p95_ms": pct(list(v), 95),
                         "p99_ms": pct(list(v), 99)} for who, v in self.latency.items()}
        total = sum(self.served_by.values())
        slices = {c: {"requests": s["requests"], "student_requests": s["student_requests"], "fallbacks": s["fallbacks"],
                      "fallback_rate": round(s["fallbacks"] / s["student_requests"], 4) if s["student_requests"] else None,
                      "p50_ms": pct(list(s["latency"]), 50), "p95_ms": pct(list(s["latency"]), 95),
                      "mean_confidence": round(sum(s["confidence"]) / len(s["confidence"]), 4) if s["confidence"]
                      else None} for c, s in sorted(self.slices.items())}
        return {"since": self.started, "requests": total, "served_by": dict(self.served_by),
                "fallbacks": dict(self.fallbacks), "errors": dict(self.errors),
                "fallback_rate": round(sum(self.fallbacks.values()) / total, 4) if total else None,
                "latency": latency, "slices": slices,
                "shadow_agreement": {c: {"requests": n, "agreement": round(s / n, 4)}
                                     for c, (s, n) in sorted(self.shadow.items()) if n}}
