"""A teacher's rate limits: requests per minute and tokens per minute as token buckets, paused for a 429's
Retry-After and slowed by it (multiplicative decrease), recovering while no 429 comes (additive increase),
like TCP's congestion control. The ledger (`ledger.TeacherLedger`) holds one per teacher.

`clock` is the time source (seconds, monotonic): the real one by default, a fake one in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIN_RATE_FACTOR = 0.1  # never slow below a tenth of the configured rate
RECOVERY_PER_S = 0.01  # regain 1% of the configured rate per second without a 429
DECREASE = 0.8  # a burst of 429s slows the rate to this fraction of what it was
QUIET_S = 1.0  # 429s closer together than this are one burst; recovery starts this long after the last


class TokenBucket:
    """A continuous-refill bucket; `rate_per_s * burst_s` (at least 1) is its capacity."""

    def __init__(self, rate_per_s: float, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        self.clock = clock
        # Start empty: a provider counts requests per sliding minute, and a full bucket at start
        # would let the first minute see the limit plus one burst.
        self.level = 0.0
        self.stamp = clock()

    def refill(self, factor: float) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate * factor)
        self.stamp = now

    def wait_for(self, amount: float, factor: float) -> float:
        """Seconds until `amount` is available (0 when it is now). More than the capacity waits for a full
        bucket; taking it then leaves a debt that the next requests wait for."""
        self.refill(factor)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / (self.rate * factor)

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Requests per minute and tokens per minute (0: none), both at `factor` of their configured rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.factor = 1.0
        self.paused_until = 0.0
        self.last_429 = float("-inf")
        self.throttled = 0
        self.recover_stamp = clock()

    def configure(self, requests_per_minute: float, tokens_per_minute: float, burst_s: float = 1.0) -> None:
        """Set the limits; a bucket whose rate is unchanged keeps its level (a step starting mid-run)."""
        if self.requests is None or self.requests.rate != requests_per_minute / 60.0:
            self.requests = TokenBucket(requests_per_minute / 60.0, burst_s, self.clock)
        rate = tokens_per_minute / 60.0
        if tokens_per_minute <= 0:
            self.tokens = None
        elif self.tokens is None or self.tokens.rate != rate:
            self.tokens = TokenBucket(rate, burst_s, self.clock)

    def wait(self, est_tokens: int) -> float:
        """Seconds until one request of `est_tokens` may go (0: now)."""
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        self._recover(now)
        wait = self.requests.wait_for(1, self.factor)
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_for(est_tokens, self.factor))
        return wait

    def take(self, permits: int, est_tokens: int) -> int:
        """Take up to `permits` requests of `est_tokens` each (at least one: call after `wait` said 0)."""
        granted = max(1, min(permits, int(self.requests.level)))
        if self.tokens is not None:
            granted = min(granted, max(1, int(self.tokens.level // max(1, est_tokens))))
        self.requests.level -= granted
        if self.tokens is not None:
            self.tokens.level -= granted * est_tokens
        return granted

    def settle(self, token_correction: int = 0, unused: int = 0, unused_tokens: int = 0) -> None:
        """Real usage minus the estimate (`token_correction`, negative: a refund), and `unused` permits of
        `unused_tokens` in all that were never sent (refunded, up to the buckets' capacity)."""
        if self.tokens is not None:
            self.tokens.level -= token_correction
        if unused:
            self.requests.give_back(unused)
            if self.tokens is not None:
                self.tokens.give_back(unused_tokens)

    def throttle(self, retry_after_s: float) -> None:
        """A 429: pause every request for Retry-After and slow down (once per burst of 429s)."""
        now = self.clock()
        self.throttled += 1
        self.paused_until = max(self.paused_until, now + retry_after_s)
        if now - self.last_429 > QUIET_S:
            self.factor = max(MIN_RATE_FACTOR, self.factor * DECREASE)
        self.last_429 = now

    def _recover(self, now: float) -> None:
        """Additive increase: regain rate while no 429 has come for QUIET_S."""
        elapsed, self.recover_stamp = now - self.recover_stamp, now
        if self.factor < 1.0 and now - self.last_429 > QUIET_S:
            self.factor = min(1.0, self.factor + RECOVERY_PER_S * elapsed)
