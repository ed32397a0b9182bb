"""Who answers a request: the routing and fallback rules of the serve app, free of Ray and HTTP.

- shadow: the teacher answers; the student runs too (in the background) and both are logged.
- canary: a stable `canary_percent` share of users gets the student: the user key (the request's
  `user`, else the `x-user-id` header) is hashed to a bucket in [0, 10000) — the same user always
  lands in the same bucket, so raising the percentage only adds users, and 0 sends everyone back.
  Requests without a user key are hashed by request id (not sticky: there is nothing to stick to).
- full: every request goes to the student.
In canary and full, a student answer falls back to the teacher when its confidence (mean token
logprob) is below `min_confidence`, when it took longer than `latency_budget_ms`, or when the
student failed. A `Breaker` stops calling a student that keeps failing (a dead replica makes every
call wait out the latency budget) and tries it again after a cool-down.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from distill_ray.config.schema import Rollout, RolloutMode

Mode = RolloutMode
BUCKETS = 10_000


def bucket(user_key: str, salt: str = "") -> int:
    """The user's stable bucket in [0, BUCKETS)."""
    digest = hashlib.sha256(f"{salt}:{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def student_answers(rollout: Rollout, user_key: str, salt: str = "") -> bool:
    """Whether the student answers this user (False in shadow mode: the teacher answers)."""
    if rollout.mode == "full":
        return True
    if rollout.mode == "shadow":
        return False
    return bucket(user_key, salt) < rollout.canary_percent * BUCKETS / 100


def fallback_reason(rollout: Rollout, *, error: str | None, confidence: float | None, latency_ms: float | None,
                    timed_out: bool = False, unavailable: bool = False) -> str | None:
    """Why a student answer must not be served (None: serve it). `timed_out`: the router stopped
    waiting for the student at the latency budget; `unavailable`: the breaker did not call it."""
    if unavailable:
        return "student_unavailable"
    if error is not None:
        return "student_error"
    if timed_out or (latency_ms is not None and latency_ms > rollout.latency_budget_ms):
        return "latency_budget"
    if confidence is None or confidence < rollout.min_confidence:
        return "low_confidence"
    return None


class Breaker:
    """A circuit breaker around the student: `failures` consecutive errors or timeouts open it for
    `cooldown_s` (the router answers from the teacher at once, reason 'student_unavailable'); then
    one request may try the student again (half-open): success closes it, failure re-opens it."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.consecutive = 0
        self.open_until: float | None = None
        self.trial_in_flight = False
        self.opened = 0  # how many times it opened (for the stats)

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "open" if self.clock() < self.open_until else "half_open"

    def allow(self) -> bool:
        """Whether this request may call the student (in half-open, only one trial at a time)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def record(self, ok: bool) -> None:
        if ok:
            self.consecutive, self.open_until, self.trial_in_flight = 0, None, False
            return
        self.consecutive += 1
        if self.trial_in_flight or self.consecutive >= self.failures:
            if self.state == "closed":
                self.opened += 1
            self.open_until, self.trial_in_flight = self.clock() + self.cooldown_s, False
