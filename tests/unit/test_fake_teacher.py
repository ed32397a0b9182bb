"""The fake teacher as the official openai client sees it: answers, logprobs, scripted faults, the ledger."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from tests.fakes.openai_server import FakeTeacher, FakeTeacherConfig, prompt_key

API_KEY = "sk-fake-test"


@pytest.fixture(scope="module")
def teacher():
    config = FakeTeacherConfig(
        api_key=API_KEY,
        low_confidence=["not sure"],
        faults={"ORD-000500": ["500", "malformed", "ok"], "hang up": ["reset"], "stall": ["timeout"]},
        timeout_fault_s=0.6,
    )
    with FakeTeacher(config) as running:
        yield running


@pytest.fixture
def client(teacher):
    teacher.reset()
    return openai.OpenAI(base_url=teacher.base_url, api_key=API_KEY, max_retries=0)


def _ask(client, text: str, **kwargs):
    return client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": text}], **kwargs)


def test_answer_has_logprobs_and_usage(client, teacher):
    reply = _ask(client, "Hi, where is order ord-482913? It was due Monday.", logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == "ORD-482913"
    assert choice.finish_reason == "stop"
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == "ORD-482913"
    assert [t.logprob for t in tokens] == [-0.01] * 3
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in tokens)
    assert all(alt.logprob < t.logprob for t in tokens for alt in t.top_logprobs[1:])
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3 > 3

    unsure = _ask(client, "I'm not sure I ever ordered anything", logprobs=True)
    assert unsure.choices[0].message.content == "NONE"
    assert unsure.choices[0].logprobs.content[0].logprob == -2.0
    assert _ask(client, "ORD-482913").choices[0].logprobs is None
    assert teacher.stats()["answered"] == 3


def test_scripted_faults_then_success_bill_once(client, teacher):
    messages = [{"role": "user", "content": "Where is ORD-000500?"}]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="teacher", messages=messages)
    # openai parses a 200 with a JSON content type and a non-JSON body with response.json(): the decode
    # error surfaces as is, not as an openai.APIError.
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        client.chat.completions.create(model="teacher", messages=messages)
    assert client.chat.completions.create(model="teacher", messages=messages).choices[0].message.content == "ORD-000500"

    stats = teacher.stats()
    assert stats["billed_per_prompt"] == {prompt_key(messages): 1}
    assert stats["attempts_per_prompt"] == {prompt_key(messages): 3}
    assert stats["by_kind"] == {"500": 1, "malformed": 1, "ok": 1}
    assert stats["by_status"] == {"500": 1, "200": 2}


def test_wrong_key_is_an_authentication_error(teacher):
    client = openai.OpenAI(base_url=teacher.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        _ask(client, "ORD-123456")
    assert raised.value.code == "invalid_api_key"


def test_reset_is_a_connection_error_and_not_billed(client, teacher):
    with pytest.raises(openai.APIConnectionError) as raised:
        _ask(client, "please hang up")
    assert not isinstance(raised.value, openai.APITimeoutError)
    assert _ask(client, "please hang up").choices[0].message.content == "NONE"  # the second attempt is "ok"
    assert teacher.stats()["by_kind"] == {"reset": 1, "ok": 1}


def test_timeout_fault_outlasts_the_client_and_is_not_billed(teacher):
    client = openai.OpenAI(base_url=teacher.base_url, api_key=API_KEY, max_retries=0, timeout=0.2)
    teacher.reset()
    with pytest.raises(openai.APITimeoutError):
        _ask(client, "stall ORD-111111")
    assert teacher.stats()["in_flight"] == 1  # the teacher still works on it...
    deadline = time.monotonic() + 5
    while teacher.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = teacher.stats()  # ...then finds the client gone: nothing delivered, nothing billed
    assert stats["by_kind"] == {"timeout": 1, "abandoned": 1} and stats["answered"] == 0


def test_rpm_burst_answers_exactly_rpm_then_429_with_retry_after():
    async def burst(base_url: str) -> list:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)

        async def one(i: int):
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
                return 200
            except openai.RateLimitError as exc:
                return int(exc.response.headers["Retry-After"])

        try:
            return await asyncio.gather(*(one(i) for i in range(40)))
        finally:
            await client.close()

    with FakeTeacher(FakeTeacherConfig(rpm=30, latency_s=0.01)) as teacher:
        outcomes = asyncio.run(burst(teacher.base_url))
        stats = teacher.stats()
    assert outcomes.count(200) == 30
    retry_after = [o for o in outcomes if o != 200]
    assert len(retry_after) == 10 and all(1 <= s <= 61 for s in retry_after)
    assert stats["answered"] == 30 and stats["by_status"] == {"200": 30, "429": 10}
    assert stats["by_kind"] == {"ok": 30, "rate_limited": 10}
    assert stats["max_in_flight"] > 1  # the burst really was concurrent


def test_config_names_a_bad_fault():
    with pytest.raises(ValueError, match=r"faults\['x'\]: unknown fault '502'"):
        FakeTeacherConfig(faults={"x": ["502"]})
    config = FakeTeacherConfig(rpm=5, faults={"*": ["429", "ok"]})
    assert FakeTeacherConfig.from_json(config.to_json()) == config
