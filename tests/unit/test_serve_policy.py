"""The serve app's routing rules: sticky canary share, modes, fallback reasons."""

from __future__ import annotations

import pytest

from distill_ray.config.schema import Serve
from distill_ray.serve.deployment import configured_rollout
from distill_ray.serve.policy import Breaker, Rollout, fallback_reason, student_answers


def _rollout(**settings) -> Rollout:
    """A rollout as the app starts it from `serve:` (the section's defaults for what is not given)."""
    return configured_rollout(Serve(**settings))


def test_canary_25_percent_of_1000_users_is_sticky():
    users = [f"user-{i}" for i in range(1000)]
    rollout = _rollout(mode="canary", canary_percent=25)
    first = {u: student_answers(rollout, u) for u in users}
    share = sum(first.values()) / len(users)
    assert 0.21 <= share <= 0.29  # 25% +- 4 pp
    for _ in range(3):  # each user always on one path
        assert all(student_answers(rollout, u) == first[u] for u in users)
    # Raising the share only adds users; 0 is the instant rollback.
    wider = {u: student_answers(_rollout(mode="canary", canary_percent=50), u) for u in users}
    assert all(wider[u] for u in users if first[u]) and sum(wider.values()) > sum(first.values())
    assert not any(student_answers(_rollout(mode="canary", canary_percent=0), u) for u in users)


def test_modes_and_fallback_reasons():
    assert not student_answers(_rollout(mode="shadow", canary_percent=100), "u")
    assert student_answers(_rollout(mode="full"), "u")
    r = _rollout(mode="full", min_confidence=-0.3, latency_budget_ms=500)
    assert fallback_reason(r, error=None, confidence=-0.1, latency_ms=100) is None
    assert fallback_reason(r, error=None, confidence=-0.5, latency_ms=100) == "low_confidence"
    assert fallback_reason(r, error=None, confidence=-0.1, latency_ms=900) == "latency_budget"
    assert fallback_reason(r, error="boom", confidence=None, latency_ms=None) == "student_error"
    assert fallback_reason(r, error=None, confidence=None, latency_ms=500, timed_out=True) == "latency_budget"
    with pytest.raises(ValueError, match="canary_percent"):
        _rollout(mode="canary", canary_percent=120)


def test_the_student_gets_the_conversation_without_the_few_shot_turns():
    from distill_ray.chat import strip_few_shot

    shots = [{"role": "user", "content": "Where is ORD-1?"}, {"role": "assistant", "content": "ORD-1"}]
    system = {"role": "system", "content": "Extract the order number."}
    ask = {"role": "user", "content": "Refund ORD-512874 please"}
    assert strip_few_shot([system, *shots, ask], shots) == [system, ask]
    assert strip_few_shot([system, ask], shots) == [system, ask]  # a client that sends none
    assert strip_few_shot([system, shots[0], ask], shots) == [system, shots[0], ask]  # only the whole block goes


def test_breaker_opens_after_consecutive_failures_and_retries_one_request_after_the_cooldown():
    now = [0.0]
    breaker = Breaker(failures=3, cooldown_s=5, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.record(ok=False)
    breaker.record(ok=True)  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record(ok=False)
    assert breaker.state == "open" and not breaker.allow() and breaker.opened == 1
    now[0] = 5.1
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record(ok=False)  # the trial failed: open again, no wait for `failures` more
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.3
    assert breaker.allow()
    breaker.record(ok=True)
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_the_app_starts_with_the_rollout_serve_configures():
    from distill_ray.config.schema import Serve
    from distill_ray.serve.deployment import configured_rollout

    s = Serve(mode="canary", canary_percent=25, min_confidence=-0.5, latency_budget_ms=900)
    assert configured_rollout(s) == _rollout(mode="canary", canary_percent=25.0, min_confidence=-0.5,
                                            latency_budget_ms=900.0)
    assert configured_rollout(Serve()).model_dump() == {k: float(v) if k != "mode" else v for k, v in
                                                        Serve().model_dump(include=set(Rollout.model_fields)).items()}
