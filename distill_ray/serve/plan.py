"""The rollout plan (`serve.rollout_plan`): a rollout that drives itself, free of Ray and HTTP.

Stages run in order, e.g. shadow → 5% → 25% → 100%. Every router replica reports the outcome of
each request the student handled (`Outcome`: in shadow stages its background comparison with the
teacher, in canary and full the requests routed to it); the plan judges them against the stage's
guardrails (`serve.guardrails`, overridden per stage):
- it *advances* when the stage has seen `min_requests` student requests and every guardrail holds,
  over the whole stage and over its last `window_requests`;
- it *steps back* one stage at once when a guardrail breaks over the last `window_requests`, and
  then holds (no advance by itself) until a person resumes it: a student that keeps breaking walks
  back stage by stage to the first.
A rate is judged early when its misses alone already break it for a full window (15 fallbacks
out of the first 20 requests break a 30% limit over a window of 50, whatever comes next), so a
student that degrades is pulled back within one window. Each decision keeps its numbers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distill_ray.config.schema import Guardrails, RolloutStage

MIN_P95_SAMPLES = 20  # a p95 over fewer requests says little
STAGE_LATENCIES = 10_000  # the stage's p95 is over its last this many requests


@dataclass(frozen=True)
class Outcome:
    """One student request, as the plan sees it."""

    stage: int  # the plan stage the router routed it under (late reports of an old stage are ignored)
    latency_ms: float
    fallback: bool = False  # its answer was replaced by the teacher's
    error: bool = False  # the student failed, timed out, or the request ended in an error response
    agreement: float | None = None  # shadow stages: agreement with the teacher's answer


@dataclass
class _Tally:
    requests: int = 0
    fallbacks: int = 0
    errors: int = 0
    agreement_sum: float = 0.0
    agreement_n: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=STAGE_LATENCIES))

    def add(self, o: Outcome) -> None:
        self.requests += 1
        self.fallbacks += o.fallback
        self.errors += o.error
        if o.agreement is not None:
            self.agreement_sum += o.agreement
            self.agreement_n += 1
        self.latencies.append(o.latency_ms)


def _p95(values: list[float], min_n: int = MIN_P95_SAMPLES) -> float | None:
    if not values or len(values) < min_n:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def judge(g: Guardrails, outcomes: list[Outcome], full_window: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """(figures, broken guardrails) over `outcomes`. With `full_window`, rates count the misses
    against a full window (a break that no later request could mend is a break now), and the
    shadow agreement is judged once a window's worth of comparisons is in (a mean has no early
    certainty)."""
    agreed = [o.agreement for o in outcomes if o.agreement is not None]
    return _check(g, len(outcomes), sum(o.fallback for o in outcomes), sum(o.error for o in outcomes),
                  [o.latency_ms for o in outcomes], sum(agreed), len(agreed), base=max(len(outcomes), full_window or 0),
                  min_p95=min(MIN_P95_SAMPLES, full_window or MIN_P95_SAMPLES),
                  min_agreement=min(full_window or 0, g.window_requests))


def _check(g: Guardrails, n: int, fallbacks: int, errors: int, latencies: list[float], agreement_sum: float,
           agreement_n: int, *, base: int, min_p95: int, min_agreement: int) -> tuple[dict[str, Any], list[str]]:
    figures: dict[str, Any] = {"requests": n}
    broken: list[str] = []
    if not n:
        return figures, broken
    figures["fallback_rate"] = round(fallbacks / n, 4)
    figures["error_rate"] = round(errors / n, 4)
    if g.max_fallback_rate is not None and fallbacks / base > g.max_fallback_rate:
        broken.append(f"fallback rate {fallbacks}/{n} > {g.max_fallback_rate:g}")
    if g.max_error_rate is not None and errors / base > g.max_error_rate:
        broken.append(f"error rate {errors}/{n} > {g.max_error_rate:g}")
    p95 = _p95(latencies, min_p95)
    figures["p95_ms"] = None if p95 is None else round(p95, 1)
    if g.max_p95_ms is not None and p95 is not None and p95 > g.max_p95_ms:
        broken.append(f"p95 {p95:.0f} ms > {g.max_p95_ms:g} ms")
    if agreement_n:
        mean = agreement_sum / agreement_n
        figures["shadow_agreement"] = round(mean, 4)
        if g.min_shadow_agreement is not None and agreement_n >= min_agreement and mean < g.min_shadow_agreement:
            broken.append(f"shadow agreement {mean:.3f} < {g.min_shadow_agreement:g}")
    return figures, broken


class RolloutPlan:
    """The plan's state: the current stage, its tallies and the decisions so far."""

    def __init__(self, stages: list[RolloutStage], guardrails: Guardrails, gate_passed: bool = True,
                 clock=time.time):
        if not stages:
            raise ValueError("a rollout plan needs at least one stage")
        self.stages, self.clock = stages, clock
        self.guardrails = [Guardrails.model_validate({**guardrails.model_dump(), **s.guardrails}) for s in stages]
        self.gate_passed = gate_passed
        self.index = 0
        self.held: str | None = None  # why the plan does not advance by itself (None: it does)
        self.decisions: list[dict[str, Any]] = []
        self._enter(0)

    def _enter(self, index: int) -> None:
        self.index = index
        self.stage_started = self.clock()
        self.tally = _Tally()
        self.window: deque[Outcome] = deque(maxlen=self.guardrails[index].window_requests)

    @property
    def stage(self) -> RolloutStage:
        return self.stages[self.index]

    def rollout_changes(self) -> dict[str, Any]:
        """The routing the current stage asks for."""
        stage = self.stage
        return {"mode": stage.mode, "canary_percent": 0.0 if stage.stage == "shadow" else float(min(stage.stage, 100))}

    def record(self, outcomes: list[Outcome]) -> dict[str, Any] | None:
        """Take the routers' new outcomes; a decision (and the stage moved) when one is due."""
        for o in outcomes:
            if o.stage == self.index:
                self.tally.add(o)
                self.window.append(o)
        return self.decide()

    def decide(self) -> dict[str, Any] | None:
        g = self.guardrails[self.index]
        window = list(self.window)
        figures, broken = judge(g, window, full_window=g.window_requests)
        if broken:
            if self.index == 0 and self.held:
                return None  # already back at the first stage, held: nothing left to pull back
            return self._move(max(0, self.index - 1), "step_back", "; ".join(broken), figures,
                              hold="guardrail broke at " + self.stage.label + ": " + "; ".join(broken))
        if self.held or self.index == len(self.stages) - 1 or self.tally.requests < g.min_requests:
            return None
        t = self.tally
        whole, stage_broken = _check(g, t.requests, t.fallbacks, t.errors, list(t.latencies), t.agreement_sum,
                                     t.agreement_n, base=t.requests, min_p95=min(MIN_P95_SAMPLES, g.window_requests),
                                     min_agreement=0)
        if g.min_shadow_agreement is not None and self.stage.mode == "shadow" and not t.agreement_n:
            stage_broken.append("no shadow comparison in the stage")
        if stage_broken:
            return None  # not good enough to advance; the window decides whether to step back
        nxt = self.stages[self.index + 1]
        if nxt.mode != "shadow" and not self.gate_passed:
            self.held = "the student did not pass eval: it may not answer clients (serve.skip_eval_gate overrides)"
            return self._log("hold", self.index, self.index, self.held, whole)
        return self._move(self.index + 1, "advance", "every guardrail held", {**whole, "window": figures})

    def _move(self, to: int, action: str, reason: str, figures: dict[str, Any], hold: str | None = None
              ) -> dict[str, Any]:
        frm = self.index
        self._enter(to)
        if hold:
            self.held = hold
        return self._log(action, frm, to, reason, figures)

    def _log(self, action: str, frm: int, to: int, reason: str, figures: dict[str, Any]) -> dict[str, Any]:
        decision = {"time": self.clock(), "action": action, "from": self.stages[frm].label, "to": self.stages[to].label,
                    "reason": reason, "figures": figures}
        self.decisions.append(decision)
        del self.decisions[:-50]
        return decision

    def restore(self, index: int, held: str | None) -> dict[str, Any]:
        """Back at a stage recorded before (a re-made control actor), its tallies fresh."""
        self._enter(max(0, min(index, len(self.stages) - 1)))
        self.held = held
        return self._log("restore", self.index, self.index, "the control actor was re-made", {})

    def pause(self, why: str) -> dict[str, Any]:
        self.held = why
        return self._log("pause", self.index, self.index, why, {})

    def resume(self) -> dict[str, Any]:
        """Re-arm the plan from the current stage, its tallies fresh."""
        self.held = None
        self._enter(self.index)
        return self._log("resume", self.index, self.index, "resumed by an admin", {})

    def status(self) -> dict[str, Any]:
        g = self.guardrails[self.index]
        figures, _ = judge(g, list(self.window))
        return {"stages": [s.label for s in self.stages], "stage": self.stage.label, "index": self.index,
                "held": self.held, "stage_requests": self.tally.requests, "min_requests": g.min_requests,
                "stage_started": self.stage_started, "window": figures, "guardrails": g.model_dump(),
                "decisions": self.decisions[-10:]}
