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
    granted: int  # how many requests may be sent
    reason: str | None = None  # "budget" when none were granted


class LeaseClient:
    """A worker's side of the limiter: leases in small batches and settles in batches.

    One actor call then serves several requests, which is what lets one limiter keep up with many
    workers (bench/teacher.py measures it). A batch's unused leases are returned when it ends.
    """

    def __init__(self, limiter, batch: int, flush_s: float = 0.01):
        self.limiter, self.batch, self.flush_s = limiter, max(1, batch), flush_s
        self.permits = 0
        self.waiting = 0
        self.lock = asyncio.Lock()
        self.est_tokens = 0
        self.est_cost = 0.0
        self.pending = [0, 0, 0.0, 0.0, 0]  # count, token correction, estimated cost, cost, answered
        self.last_flush = time.monotonic()
        self.flush_timer: asyncio.TimerHandle | None = None

    async def acquire(self, est_tokens: int, est_cost: float) -> bool:
        self.waiting += 1
        try:
            async with self.lock:
                if self.permits == 0:
                    lease = await self.limiter.acquire.remote(min(self.batch, self.waiting), est_tokens, est_cost)
                    if lease.granted == 0:
                        return False
                    self.permits += lease.granted
                self.permits -= 1
                self.est_tokens, self.est_cost = est_tokens, est_cost
                return True
        finally:
            self.waiting -= 1

    def settle(self, est_tokens: int, used_tokens: int, est_cost: float, cost: float, answered: bool) -> None:
        p = self.pending
        p[0] += 1
        p[1] += used_tokens - est_tokens
        p[2] += est_cost
        p[3] += cost
        p[4] += int(answered)
        if p[0] >= self.batch or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()
        elif self.flush_timer is None:
            # Never hold a finished request's slot for long: the other workers may be waiting on it.
            self.flush_timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def throttle(self, retry_after_s: float) -> None:
        self.limiter.throttle.remote(retry_after_s)

    def flush(self) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if self.pending[0]:
            self.limiter.settle.remote(*self.pending)
            self.pending = [0, 0, 0.0, 0.0, 0]
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """End of a batch: settle what is pending and return unused leases."""
        self.flush()
        if self.permits:
            # Unused leases: free their slots and their reserved cost, and refund their permits.
            self.limiter.settle.remote(self.permits, 0, self.permits * self.est_cost, 0.0)
            self.limiter.refund.remote(self.permits, self.est_tokens)
            self.permits = 0


class TokenBucket:
    """A continuous-refill bucket; `rate_per_s * burst_s` is its capacity."""

    def __init__(self, rate_per_s: float, burst_s: float = 1.0):
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        # Start empty: a provider counts requests per sliding minute, and a full bucket at start
        # would let the first minute see the limit plus one burst.
        self.level = 0.0
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
        self.answered = 0  # answers received (progress)
        self.reserved = 0.0
        self.factor = 1.0
        self.paused_until = 0.0
        self.last_429 = 0.0
        self.throttled = 0
        self.recover_stamp = time.monotonic()
        self.lock = asyncio.Lock()  # FIFO: leases are granted in the order they were asked
        self.freed = asyncio.Event()  # set whenever in-flight slots come back

    def _recover(self, now: float) -> None:
        """Additive increase: regain rate while no 429 has come for a second."""
        elapsed, self.recover_stamp = now - self.recover_stamp, now
        if self.factor < 1.0 and now - self.last_429 > 1.0:
            self.factor = min(1.0, self.factor + RECOVERY_PER_S * elapsed)

    async def acquire(self, count: int, est_tokens: int, est_cost: float) -> Lease:
        """Lease up to `count` requests (each of `est_tokens` tokens and `est_cost` dollars).

        Waits until at least one can be granted; grants as many as the buckets, the free concurrency
        slots and the budget allow at that moment. Refused (granted 0) only by the budget.
        """
        async with self.lock:
            affordable = count if self.budget is None or est_cost <= 0 else int(
                (self.budget - self.spent - self.reserved) // est_cost)
            if affordable <= 0:
                return Lease(0, "budget")
            count = min(count, affordable)
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
                    self.freed.clear()
                    try:  # woken as soon as a settle frees a slot
                        await asyncio.wait_for(self.freed.wait(), timeout=max(wait, 0.25))
                    except TimeoutError:
                        pass
                    continue
                if wait <= 0:
                    break
                await asyncio.sleep(min(wait, 0.25))
            granted = min(count, int(self.requests.level), self.max_concurrency - self.in_flight)
            if self.tokens is not None:
                granted = min(granted, max(1, int(self.tokens.level // max(1, est_tokens))))
            granted = max(1, granted)
            self.requests.level -= granted
            if self.tokens is not None:
                self.tokens.level -= granted * est_tokens
            self.in_flight += granted
            self.reserved += granted * est_cost
            return Lease(granted)

    async def settle(self, count: int, token_correction: int, est_cost: float, cost: float, answered: int = 0) -> None:
        """End `count` leases: free their slots, correct tokens and spend with the real usage.

        Unused leases come back the same way with `cost` 0; their request permits are refunded.
        """
        self.in_flight = max(0, self.in_flight - count)
        self.freed.set()
        self.answered += answered
        self.reserved = max(0.0, self.reserved - est_cost)
        self.spent += cost
        if self.tokens is not None:
            self.tokens.level -= token_correction  # a refund when estimates were high

    def refund(self, count: int, est_tokens: int) -> None:
        """Leases granted but never used (their batch ended): give the permits back."""
        self.requests.level = min(self.requests.capacity, self.requests.level + count)
        if self.tokens is not None:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + count * est_tokens)

    def throttle(self, retry_after_s: float) -> None:
        """A 429: pause everyone for Retry-After and slow down."""
        now = time.monotonic()
        self.throttled += 1
        self.paused_until = max(self.paused_until, now + retry_after_s)
        if now - self.last_429 > 1.0:  # one decrease per burst of 429s
            self.factor = max(MIN_RATE_FACTOR, self.factor * 0.8)
        self.last_429 = now

    def state(self) -> dict:
        return {"answered": self.answered, "in_flight": self.in_flight, "spent_usd": self.spent, "reserved_usd": self.reserved,
                "rate_factor": round(self.factor, 3), "throttled": self.throttled}
