"""The teacher's rate limiter on a fake clock (no real waiting): requests and tokens per minute, the burst,
the refill, refunds, and a 429's pause and slow-down with its recovery."""

from __future__ import annotations

import pytest

from distill_ray.teacher.limiter import MIN_RATE_FACTOR, RateLimiter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(rpm: float, tpm: float = 0, burst_s: float = 1.0) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    rate = RateLimiter(clock)
    rate.configure(rpm, tpm, burst_s)
    return rate, clock


def send_for(rate: RateLimiter, clock: FakeClock, seconds: float, est_tokens: int = 1) -> list[float]:
    """Send one request at a time, each as soon as the limiter lets it; the times they went, from the start."""
    start, sent = clock.now, []
    while True:
        wait = rate.wait(est_tokens)
        if clock.now + wait - start > seconds:
            return sent
        clock.advance(wait)
        rate.take(1, est_tokens)
        sent.append(clock.now - start)


def test_requests_per_minute_is_the_pace_from_an_empty_start():
    rate, clock = limiter(rpm=600)
    sent = send_for(rate, clock, 60.0)
    assert len(sent) == 600  # a sliding minute sees the limit, not the limit plus a burst
    assert sent[0] == pytest.approx(0.1)  # the bucket starts empty: the first request waits its share
    assert max(b - a for a, b in zip(sent, sent[1:], strict=False)) == pytest.approx(0.1)


def test_an_idle_bucket_fills_up_to_its_burst_and_no_further():
    rate, clock = limiter(rpm=600, burst_s=2.0)
    clock.advance(3600)  # an hour idle
    assert rate.wait(1) == 0
    assert rate.take(1000, 1) == 20  # 10 requests/s x 2 s of burst, not an hour's worth
    assert rate.wait(1) == pytest.approx(0.1)


def test_a_slow_teacher_still_gets_one_request_per_refill():
    rate, clock = limiter(rpm=1, burst_s=1.0)  # capacity is at least one request
    assert rate.wait(1) == pytest.approx(60.0)
    clock.advance(60.0)
    assert rate.take(5, 1) == 1


def test_tokens_per_minute_paces_large_requests_and_a_request_over_the_burst_still_goes():
    rate, clock = limiter(rpm=10_000, tpm=6_000)  # 100 tokens/s: a 1,000-token request is 10 s of tokens
    sent = send_for(rate, clock, 60.0, est_tokens=1_000)
    # Larger than the bucket (100 tokens): it goes when the bucket is full and leaves a debt the next one waits out.
    assert len(sent) == 6
    assert [round(b - a, 6) for a, b in zip(sent, sent[1:], strict=False)] == [10.0] * 5


def test_take_grants_what_both_buckets_hold():
    rate, clock = limiter(rpm=600, tpm=60_000)  # 10 requests/s, 1,000 tokens/s
    clock.advance(1.0)
    assert rate.wait(400) == 0
    assert rate.take(10, 400) == 2  # the requests bucket holds 10, the tokens bucket 2 requests of 400


def test_unused_permits_and_an_overestimate_come_back_up_to_the_capacity():
    rate, clock = limiter(rpm=600, tpm=60_000)
    clock.advance(1.0)
    assert rate.wait(100) == 0
    granted = rate.take(5, 100)
    assert granted == 5 and rate.requests.level == pytest.approx(5)
    rate.settle(token_correction=-50, unused=3, unused_tokens=300)  # 2 sent, each used 25 tokens fewer
    assert rate.requests.level == pytest.approx(8)
    assert rate.tokens.level == pytest.approx(1000 - 500 + 50 + 300)
    rate.settle(unused=100, unused_tokens=100_000)
    assert rate.requests.level == rate.requests.capacity == 10
    assert rate.tokens.level == rate.tokens.capacity == 1000


def test_a_429_pauses_every_request_for_its_retry_after_and_slows_the_rate():
    rate, clock = limiter(rpm=60)
    clock.advance(1.0)
    assert rate.wait(1) == 0
    rate.throttle(5.0)
    assert rate.wait(1) == pytest.approx(5.0)  # paused although the bucket holds a request
    clock.advance(5.0)
    assert rate.wait(1) == 0
    # slowed to 0.8 by the 429, and 1% a second regained since the limiter last looked (4 s past the quiet second)
    assert rate.factor == pytest.approx(0.85)
    rate.take(1, 1)
    assert rate.wait(1) == pytest.approx(1 / 0.85)  # 51 requests/min, not 60


def test_a_burst_of_429s_slows_once_and_the_rate_recovers_without_them():
    rate, clock = limiter(rpm=60)
    for _ in range(5):  # five 429s within a second: one burst
        rate.throttle(0.0)
        clock.advance(0.1)
    assert rate.factor == pytest.approx(0.8) and rate.throttled == 5
    clock.advance(0.5)
    rate.wait(1)
    assert rate.factor == pytest.approx(0.8)  # no recovery within a second of the last 429
    clock.advance(10.0)
    rate.wait(1)
    assert rate.factor == pytest.approx(0.9)  # 1% of the rate per second
    clock.advance(60.0)
    rate.wait(1)
    assert rate.factor == 1.0  # and never above the configured rate


def test_429s_a_second_apart_slow_down_to_a_floor():
    rate, clock = limiter(rpm=60)
    for _ in range(50):
        rate.throttle(0.0)
        clock.advance(1.01)
    assert rate.factor == pytest.approx(MIN_RATE_FACTOR)


def test_a_bucket_reconfigured_to_the_same_rate_keeps_its_level():
    rate, clock = limiter(rpm=600)
    clock.advance(1.0)
    assert rate.wait(1) == 0
    rate.take(4, 1)
    rate.configure(600, 0)  # the next step starts with the same limits
    assert rate.requests.level == pytest.approx(6)
    rate.configure(1200, 0)
    assert rate.requests.level == 0  # new limits: a new, empty bucket


def test_token_bucket_refills_at_its_rate_times_the_factor():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10, burst_s=5, clock=clock)
    clock.advance(2.0)
    bucket.refill(0.5)
    assert bucket.level == pytest.approx(10)  # 2 s x 10/s x 0.5
    assert bucket.wait_for(30, 0.5) == pytest.approx(4.0)  # 20 more at 5/s
