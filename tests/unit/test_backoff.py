"""The teacher client's retries on a fake sleep (no real waiting): the exponential backoff, its jitter and
cap, and Retry-After honoured, against the scripted fake teacher over real HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import aiohttp
import pytest

from distill_ray.config.schema import Teacher
from distill_ray.teacher.client import MAX_BACKOFF_S, TeacherClient, backoff_s, retry_after
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig


class Edge(random.Random):
    """A random source whose uniform draws always land on one end of the range."""

    def __init__(self, low: bool):
        super().__init__(0)
        self.low = low

    def uniform(self, a: float, b: float) -> float:
        return a if self.low else b


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_doubles_per_attempt_within_its_jitter_and_stops_at_the_cap(attempt):
    full = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1))
    assert backoff_s(attempt, 0.5, Edge(low=False)) == full
    assert backoff_s(attempt, 0.5, Edge(low=True)) == full / 2
    draws = [backoff_s(attempt, 0.5, random.Random(seed)) for seed in range(200)]
    assert all(full / 2 <= d <= full for d in draws)
    assert len(set(draws)) > 100  # jittered: clients that failed together do not retry together


def test_the_cap_holds_for_any_attempt():
    assert backoff_s(40, 1.0, Edge(low=False)) == MAX_BACKOFF_S


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), ("", None)])
def test_retry_after_in_seconds(header, seconds):
    assert retry_after({"Retry-After": header}) == seconds


def test_retry_after_as_an_http_date_counts_from_now():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after({"Retry-After": date}, now=lambda: now) == pytest.approx(30.0)
    assert retry_after({"Retry-After": date}, now=lambda: now + 60) == 0.0  # already past: go now
    assert retry_after({}) is None


def _ask(base_url: str, text: str, max_retries: int = 6, backoff: float = 0.01) -> tuple[object, list[float], float]:
    """One request through TeacherClient with a sleep that records each delay and returns at once."""
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def ask():
        teacher = Teacher(name="fake", base_url=base_url, model="fake-teacher", max_retries=max_retries,
                          retry_backoff_s=backoff, timeout_s=5, max_tokens=16)
        async with aiohttp.ClientSession() as session:
            client = TeacherClient(teacher, None, None, session, rng=random.Random(0), sleep=fake_sleep)
            return await client.complete([{"role": "user", "content": text}])

    start = time.monotonic()
    answer = asyncio.run(ask())
    return answer, slept, time.monotonic() - start


def test_retry_after_is_honoured_then_the_backoff_grows():
    faults = {"ORD-100001": ["429", "500", "503", "ok"]}
    with FakeTeacher(FakeTeacherConfig(faults=faults, retry_after_s=7)) as teacher:
        answer, slept, took = _ask(teacher.base_url, "where is ORD-100001?")
    assert answer.completion == "ORD-100001" and answer.attempts == 4 and answer.error is None
    assert slept[0] == 7.0  # the 429's Retry-After, not the 0.01 s backoff
    assert 0.01 <= slept[1] <= 0.02 and 0.02 <= slept[2] <= 0.04  # attempts 2 and 3: 0.01 x 2^(n-1), jittered
    assert took < 5.0  # no real waiting


def test_a_retry_after_past_the_cap_is_still_honoured():
    with FakeTeacher(FakeTeacherConfig(faults={"ORD-100002": ["429", "ok"]}, retry_after_s=90)) as teacher:
        answer, slept, _ = _ask(teacher.base_url, "ORD-100002 is late", backoff=30.0)
    assert answer.completion == "ORD-100002"
    assert slept == [90.0]  # the server's word over MAX_BACKOFF_S (60 s)


def test_retries_run_out_with_the_last_error_and_one_sleep_between_attempts():
    with FakeTeacher(FakeTeacherConfig(faults={"ORD-100003": ["500"] * 10})) as teacher:
        answer, slept, _ = _ask(teacher.base_url, "ORD-100003", max_retries=3, backoff=1.0)
    assert answer.completion is None and answer.attempts == 4
    assert answer.error.startswith("gave up after 4 attempts: HTTP 500")
    assert len(slept) == 3  # none after the last attempt
    assert [0.5 <= slept[0] <= 1.0, 1.0 <= slept[1] <= 2.0, 2.0 <= slept[2] <= 4.0] == [True] * 3
