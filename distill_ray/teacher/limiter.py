"""One rate limit per teacher, shared by every worker on every node: a Ray actor token bucket.

Each request first takes a lease from the teacher's limiter actor: one request from the
requests-per-minute bucket, its estimated tokens (prompt estimate + max_tokens) from the
tokens-per-minute bucket, one of `max_concurrency` in-flight slots, and its estimated cost from the
budget. When the request ends the lease is settled with the real usage (the token bucket and the
spend are corrected) and the slot is returned.

A 429 from the teacher means the limits are set above what the API grants right now: the limiter
pauses every worker for the Retry-After and lowers its rate (multiplicative decrease), then
recovers it step by step while no 429 arrives (additive increase), like TCP's congestion control.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import ray

MIN_RATE_FACTOR = 0.1  # never slow below a tenth of the configured rate
RECOVERY_PER_S = 0.01  # regain 1% of the configured rate per second without a 429


@dataclass
class Lease:
    granted: bool
    reason: str | None = None  # "budget" when refused


class TokenBucket:
    """A continuous-refill bucket; `rate_per_s * burst_s` is its capacity."""

    def __init__(self, rate_per_s: float, burst_s: float = 1.0):
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, factor: float) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate * factor)
        self.stamp = now

    def wait_for(self, amount: float, factor: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        self.refill(factor)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / (self.rate * factor)


@ray.remote(num_cpus=0, max_concurrency=10_000)
class RateLimiter:
    """The cluster-wide limiter of one teacher (an async actor: waiting leases cost nothing)."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float, max_concurrency: int,
                 budget_usd: float | None = None, spent_usd: float = 0.0, burst_s: float = 1.0):
        self.requests = TokenBucket(requests_per_minute / 60.0, burst_s)
        self.tokens = TokenBucket(tokens_per_minute / 60.0, burst_s) if tokens_per_minute > 0 else None
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self.budget = budget_usd
        self.spent = spent_usd
        self.reserved = 0.0
        self.factor = 1.0
        self.paused_until = 0.0
        self.last_429 = 0.0
        self.throttled = 0
        self.recover_stamp = time.monotonic()
        self.lock = asyncio.Lock()  # FIFO: leases are granted in the order they were asked

    def _recover(self, now: float) -> None:
        """Additive increase: regain rate while no 429 has come for a second."""
        elapsed, self.recover_stamp = now - self.recover_stamp, now
        if self.factor < 1.0 and now - self.last_429 > 1.0:
            self.factor = min(1.0, self.factor + RECOVERY_PER_S * elapsed)

    async def acquire(self, est_tokens: int, est_cost: float) -> Lease:
        """Wait for a request slot, tokens and concurrency; refuse when the budget would be exceeded."""
        async with self.lock:
            if self.budget is not None and self.spent + self.reserved + est_cost > self.budget:
                return Lease(False, "budget")
            while True:
                now = time.monotonic()
                if now < self.paused_until:
                    await asyncio.sleep(self.paused_until - now)
                    continue
                self._recover(now)
                wait = self.requests.wait_for(1, self.factor)
                if self.tokens is not None:
                    wait = max(wait, self.tokens.wait_for(est_tokens, self.factor))
                if self.in_flight >= self.max_concurrency:
                    wait = max(wait, 0.005)
                if wait <= 0:
                    break
                await asyncio.sleep(min(wait, 0.25))
            self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= est_tokens
            self.in_flight += 1
            self.reserved += est_cost
            return Lease(True)

    def settle(self, est_tokens: int, used_tokens: int, est_cost: float, cost: float) -> None:
        """End a lease: correct the token bucket and the spend with the real usage."""
        self.in_flight = max(0, self.in_flight - 1)
        self.reserved = max(0.0, self.reserved - est_cost)
        self.spent += cost
        if self.tokens is not None:
            self.tokens.level -= used_tokens - est_tokens  # a refund when the estimate was high

    def throttle(self, retry_after_s: float) -> None:
        """A 429: pause everyone for Retry-After and slow down."""
        now = time.monotonic()
        self.throttled += 1
        self.paused_until = max(self.paused_until, now + retry_after_s)
        if now - self.last_429 > 1.0:  # one decrease per burst of 429s
            self.factor = max(MIN_RATE_FACTOR, self.factor * 0.8)
        self.last_429 = now

    def state(self) -> dict:
        return {"in_flight": self.in_flight, "spent_usd": self.spent, "reserved_usd": self.reserved,
                "rate_factor": round(self.factor, 3), "throttled": self.throttled}
