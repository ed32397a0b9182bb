"""The rollout plan's decisions: advance when every guardrail holds, step back at once when one breaks."""

from __future__ import annotations

from distill_ray.config.schema import Guardrails, PipelineConfig, RolloutStage
from distill_ray.serve.plan import Outcome, RolloutPlan


def _plan(gate: bool = True, **guardrails) -> RolloutPlan:
    stages = [RolloutStage.model_validate(x) for x in ("shadow", 5, 25, 100)]
    g = Guardrails.model_validate({"min_requests": 20, "window_requests": 10, "max_fallback_rate": 0.3,
                                   "max_error_rate": 0.1, "min_shadow_agreement": 0.5, **guardrails})
    return RolloutPlan(stages, g, gate_passed=gate)


def _good(plan: RolloutPlan, n: int, latency: float = 50.0) -> list:
    agreement = 1.0 if plan.stage.mode == "shadow" else None
    return [plan.record([Outcome(plan.index, latency, agreement=agreement)]) for _ in range(n)]


def test_a_good_student_advances_stage_by_stage_to_full():
    plan = _plan()
    assert plan.rollout_changes() == {"mode": "shadow", "canary_percent": 0.0}
    for want in ("5%", "25%", "100%"):
        decisions = [d for d in _good(plan, 20) if d]
        assert [d["action"] for d in decisions] == ["advance"] and plan.stage.label == want
        assert decisions[0]["figures"]["requests"] == 20  # each decision carries its numbers
    assert plan.rollout_changes() == {"mode": "full", "canary_percent": 100.0}
    assert not [d for d in _good(plan, 50) if d]  # the last stage stays


def test_a_stage_does_not_advance_before_min_requests_nor_on_late_reports():
    plan = _plan()
    assert not any(_good(plan, 19))
    assert plan.record([Outcome(3, 10.0)]) is None  # a report of another stage counts for nothing
    assert plan.record([Outcome(0, 10.0, agreement=1.0)])["action"] == "advance"


def test_a_degrading_student_is_pulled_back_within_the_window_and_held():
    plan = _plan()
    for _ in range(2):
        _good(plan, 20)
    assert plan.stage.label == "25%"
    _good(plan, 15)
    decision, sent = None, 0
    while decision is None:  # the student starts failing: every answer falls back
        decision = plan.record([Outcome(plan.index, 40.0, fallback=True)])
        sent += 1
    assert decision["action"] == "step_back" and (decision["from"], decision["to"]) == ("25%", "5%")
    assert sent <= 10 and "fallback rate" in decision["reason"]  # 4 of a window of 10 already break 30%
    assert plan.held and plan.rollout_changes()["canary_percent"] == 5.0
    assert not [d for d in _good(plan, 40) if d]  # held: no advance by itself
    plan.resume()
    assert [d["action"] for d in _good(plan, 20) if d] == ["advance"]


def test_errors_p95_and_shadow_agreement_each_pull_back():
    plan = _plan(max_p95_ms=100)
    _good(plan, 20)
    d = [plan.record([Outcome(plan.index, 500.0)]) for _ in range(10)]
    assert d[-1] and d[-1]["action"] == "step_back" and "p95" in d[-1]["reason"] and plan.stage.label == "shadow"
    plan = _plan(max_error_rate=0.05)
    _good(plan, 20)
    d = plan.record([Outcome(plan.index, 10.0, fallback=True, error=True)])  # 1 error already breaks 5% of 10
    assert d["action"] == "step_back" and "error rate" in d["reason"]
    plan = _plan()
    d = [plan.record([Outcome(0, 10.0, agreement=0.0)]) for _ in range(10)]
    assert d[-1]["action"] == "step_back" and "shadow agreement" in d[-1]["reason"] and plan.held
    assert plan.stage.label == "shadow"


def test_the_eval_gate_holds_the_plan_at_shadow():
    plan = _plan(gate=False)
    decision = [d for d in _good(plan, 20) if d][0]
    assert decision["action"] == "hold" and "did not pass eval" in plan.held and plan.stage.label == "shadow"


def test_plan_config_validates_stages_and_guardrails():
    config = PipelineConfig.model_validate({"serve": {"rollout_plan": ["shadow", 5, {"stage": 100, "guardrails": {
        "max_p95_ms": 800}}], "guardrails": {"min_requests": 50}}})
    assert [s.label for s in config.serve.rollout_plan] == ["shadow", "5%", "100%"]
    for bad, where in (({"rollout_plan": [150]}, "rollout_plan.0"),
                       ({"rollout_plan": [{"stage": 5, "guardrails": {"max_fallback_rate": 2}}]}, "rollout_plan.0.guardrails")):
        try:
            PipelineConfig.model_validate({"serve": bad})
        except ValueError as exc:
            assert where in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")
