"""The fake teacher as the official openai client sees it: answers, logprobs, scripted faults, the ledger."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig, parse_batch_input, prompt_key

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


def test_config_checks_the_reasoning_and_batch_knobs():
    assert FakeTeacherConfig().honour_idempotency_key is False  # bills a repeat, like most providers
    with pytest.raises(ValueError, match=r"reasoning_tokens: -1 must be an integer >= 0"):
        FakeTeacherConfig(reasoning_tokens=-1)
    with pytest.raises(ValueError, match=r"batch_max_requests: 0 must be an integer >= 1"):
        FakeTeacherConfig(batch_max_requests=0)
    with pytest.raises(ValueError, match=r"unsupported_params: 'max_tokens' must be a list"):
        FakeTeacherConfig(unsupported_params="max_tokens")
    config = FakeTeacherConfig(unsupported_params=["max_tokens"], reasoning_tokens=5, batch_latency_s=0.1)
    assert FakeTeacherConfig.from_json(config.to_json()) == config


def test_a_repeated_request_is_billed_again_unless_idempotency_keys_are_honoured(client, teacher):
    messages = [{"role": "user", "content": "Where is ORD-777777?"}]
    for _ in range(2):
        client.chat.completions.create(model="teacher", messages=messages, extra_headers={"Idempotency-Key": "k1"})
    assert teacher.stats()["billed_per_prompt"] == {prompt_key(messages): 2}

    teacher.configure(honour_idempotency_key=True)
    try:
        reply = client.chat.completions.create(model="teacher", messages=messages,
                                               extra_headers={"Idempotency-Key": "k1"})
    finally:
        teacher.configure(honour_idempotency_key=False)
    assert reply.choices[0].message.content == "ORD-777777"
    stats = teacher.stats()
    assert stats["billed_per_prompt"] == {prompt_key(messages): 2}
    assert stats["by_kind"] == {"ok": 2, "idempotent_replay": 1}


# A reasoning model, on OpenAI's and Azure's routes, with the Batch API.

SYSTEM = {"role": "system", "content": "You find order numbers in customer messages."}


@pytest.fixture(scope="module")
def reasoner():
    config = FakeTeacherConfig(
        api_key=API_KEY,
        unsupported_params=["max_tokens", "temperature"],
        reasoning_tokens=5,
        cached_prompt_tokens=4,
        faults={"ORD-000400": ["400"]},
        batch_latency_s=0.3,
        batch_max_requests=4,
    )
    with FakeTeacher(config) as running:
        yield running


@pytest.fixture
def reasoner_client(reasoner):
    reasoner.reset()
    return openai.OpenAI(base_url=reasoner.base_url, api_key=API_KEY, max_retries=0)


def test_reasoning_model_refuses_max_tokens_as_openai_words_it(reasoner_client, reasoner):
    with pytest.raises(openai.BadRequestError) as raised:
        _ask(reasoner_client, "Where is ORD-482913?", max_tokens=10)
    assert raised.value.param == "max_tokens" and raised.value.code == "unsupported_parameter"
    assert raised.value.body["message"] == ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                            "Use 'max_completion_tokens' instead.")
    refusal = r"- Unsupported parameter: 'temperature' is not supported with this model\.$"
    with pytest.raises(openai.BadRequestError, match=refusal):
        _ask(reasoner_client, "Where is ORD-482913?", temperature=0.0)
    stats = reasoner.stats()
    assert stats["by_kind"] == {"unsupported_parameter": 2} and stats["answered"] == 0
    assert stats["attempts_per_prompt"] == {}  # refused before the model saw it


def test_reasoning_and_cached_tokens_show_in_usage(reasoner_client, reasoner):
    def ask(text: str, limit: int, **kwargs):
        return reasoner_client.chat.completions.create(
            model="o-fake", messages=[SYSTEM, {"role": "user", "content": text}], max_completion_tokens=limit,
            **kwargs)

    first = ask("Where is ORD-482913?", 100, reasoning_effort="low", response_format={"type": "text"},
                extra_body={"store": False}, extra_headers={"X-Node": "w1"})
    assert first.choices[0].message.content == "ORD-482913" and first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == 3 + 5
    assert first.usage.completion_tokens_details.reasoning_tokens == 5
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    stats = reasoner.stats()
    assert stats["last_request_keys"] == ["max_completion_tokens", "messages", "model", "reasoning_effort",
                                          "response_format", "store"]
    headers = stats["last_request_headers"]
    assert headers["x-node"] == "w1" and headers["x-stainless-lang"] == "python" and "authorization" not in headers

    second = ask("And ORD-000007?", 100)  # the same system prompt: read from the prompt cache
    assert second.usage.prompt_tokens_details.cached_tokens == 4 < second.usage.prompt_tokens
    short = ask("And ORD-000008?", 7)  # 5 reasoning tokens leave room for 2 of the answer's 3
    assert short.choices[0].message.content == "ORD-" and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 7
    stats = reasoner.stats()
    assert stats["reasoning_tokens"] == 15 and stats["cached_tokens"] == 8
    assert stats["completion_tokens"] == 8 + 8 + 7


def test_azure_route_needs_api_version_and_takes_the_api_key_header(reasoner):
    reasoner.reset()
    azure = openai.AzureOpenAI(azure_endpoint=reasoner.url, api_version="2024-10-21", api_key=API_KEY,
                               max_retries=0)
    reply = azure.chat.completions.create(model="o-deployment", messages=[{"role": "user", "content": "ORD-482913"}],
                                          max_completion_tokens=50)
    assert reply.model == "o-deployment" and reply.choices[0].message.content == "ORD-482913"
    stats = reasoner.stats()
    assert stats["by_kind"] == {"azure": 1, "ok": 1} and stats["answered"] == 1
    assert stats["last_request_headers"]["api-key"] == "***"

    no_version = openai.OpenAI(base_url=f"{reasoner.url}/openai/deployments/o-deployment", api_key="unused",
                               default_headers={"api-key": API_KEY}, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        _ask(no_version, "ORD-482913")
    assert raised.value.body == {"code": "404", "message": "Resource not found"}
    wrong_key = openai.AzureOpenAI(azure_endpoint=reasoner.url, api_version="2024-10-21", api_key="sk-wrong",
                                   max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _ask(wrong_key, "ORD-482913")
    assert reasoner.stats()["answered"] == 1


def _batch_line(custom_id: str, text: str, url: str = "/v1/chat/completions", model: str = "o-fake", **body):
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def _upload(client, tmp_path, lines: list[dict]):
    path = tmp_path / f"batch-{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as file:
        return client.files.create(file=file, purpose="batch")


def _wait(client, batch_id: str, timeout_s: float = 10.0):
    statuses, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        statuses.append(batch.status)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch, statuses
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} still {statuses[-1]} after {timeout_s} s")


def _lines(client, file_id: str) -> dict:
    return {line["custom_id"]: line for line in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_batch_end_to_end_answers_as_live_and_bills_each_line_once(reasoner_client, reasoner, tmp_path):
    client = reasoner_client
    prompts = {"a": "Where is ORD-000001?", "b": "Refund ORD-000400", "c": "no order here", "d": "ORD-000002"}
    lines = [_batch_line(cid, text, max_completion_tokens=50) for cid, text in prompts.items()]
    lines[3]["body"]["max_tokens"] = 10  # the reasoning model refuses it, line by line
    uploaded = _upload(client, tmp_path, lines)
    assert uploaded.purpose == "batch" and uploaded.id.startswith("file-")
    assert client.files.retrieve(uploaded.id).bytes == len(client.files.content(uploaded.id).content) > 0

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"run": "unit"})
    assert created.status == "validating" and created.id.startswith("batch_")
    done, statuses = _wait(client, created.id)
    assert "in_progress" in statuses and done.status == "completed" and done.metadata == {"run": "unit"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 2, 2)
    assert done.model == "o-fake" and done.completed_at >= done.created_at

    output, errors = _lines(client, done.output_file_id), _lines(client, done.error_file_id)
    assert set(output) == {"a", "c"} and set(errors) == {"b", "d"}
    assert all(line["id"].startswith("batch_req_") and line["error"] is None for line in (*output.values(),
                                                                                          *errors.values()))
    assert errors["b"]["response"]["status_code"] == 400
    assert errors["d"]["response"]["body"]["error"]["code"] == "unsupported_parameter"
    stats = reasoner.stats()
    keys = {cid: prompt_key([{"role": "user", "content": text}]) for cid, text in prompts.items()}
    assert stats["billed_per_prompt"] == {keys["a"]: 1, keys["c"]: 1} and stats["batch_lines_billed"] == 2
    assert stats["batches_created"] == 1
    assert stats["batches"] == [{"id": done.id, "status": "completed", "total": 4, "completed": 2, "failed": 2}]
    assert stats["by_kind"] == {"ok": 2, "400": 1, "unsupported_parameter": 1}
    assert stats["reasoning_tokens"] == 10 and stats["requests"] == 0  # no live request so far
    assert [b.id for b in client.batches.list()] == [done.id]

    for cid in ("a", "c"):
        live = _ask(client, prompts[cid], max_completion_tokens=50)
        body = output[cid]["response"]["body"]
        assert output[cid]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == live.choices[0].message.content
        answer_tokens = 3 if cid == "a" else 1  # "ORD-000001" or "NONE"
        assert body["usage"]["completion_tokens"] == live.usage.completion_tokens == answer_tokens + 5


def test_batch_over_max_requests_fails_validation_and_bills_nothing(reasoner_client, reasoner, tmp_path):
    uploaded = _upload(reasoner_client, tmp_path, [_batch_line(f"q{i}", f"ORD-00000{i}") for i in range(5)])
    created = reasoner_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
    done, _ = _wait(reasoner_client, created.id)
    assert done.status == "failed" and done.failed_at is not None and done.output_file_id is None
    assert [(e.code, e.line) for e in done.errors.data] == [("too_many_requests", None)]
    assert "5 requests" in done.errors.data[0].message

    reasoner.configure(batch_fail_all=True)
    try:
        scripted = reasoner_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h")
        assert _wait(reasoner_client, scripted.id)[0].errors.data[0].code == "batch_failed"
    finally:
        reasoner.configure(batch_fail_all=False)
    stranger = openai.OpenAI(base_url=reasoner.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.batches.retrieve(created.id)
    stats = reasoner.stats()
    assert stats["answered"] == 0 and [b["status"] for b in stats["batches"]] == ["failed", "failed"]


def test_batch_validation_names_each_bad_line():
    no_body = {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}
    lines = [_batch_line("a", "x"), _batch_line("a", "y"), no_body, _batch_line("c", "z", url="/v1/embeddings"),
             _batch_line("d", "w", model="other")]
    content = "\n".join([*map(json.dumps, lines), "{not json"]).encode()
    good, errors = parse_batch_input(content, "/v1/chat/completions", max_requests=10, max_bytes=10_000)
    assert [line["custom_id"] for line in good] == ["a"]
    assert [(e["code"], e["line"]) for e in errors] == [
        ("duplicate_custom_id", 2), ("missing_required_parameter", 3), ("invalid_url", 4),
        ("mismatched_model", 5), ("invalid_json_line", 6)]
    assert errors[1]["message"] == "Missing required parameter: 'body'."
    assert parse_batch_input(content, "/v1/chat/completions", 10, 100)[1][0]["code"] == "file_too_large"


def test_batch_cancel_and_azure_batches(reasoner, tmp_path):
    reasoner.reset()
    client = openai.AzureOpenAI(azure_endpoint=reasoner.url, api_version="2024-10-21", api_key=API_KEY,
                                max_retries=0)
    lines = [_batch_line(f"q{i}", f"ORD-00000{i}", url="/chat/completions", model="o-deployment")
             for i in range(3)]
    uploaded = _upload(client, tmp_path, lines)
    cancelled = client.batches.cancel(client.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions",
                                                            completion_window="24h").id)
    assert cancelled.status == "cancelling"
    done, _ = _wait(client, cancelled.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert reasoner.stats()["batch_lines_billed"] == done.request_counts.completed  # the work done is paid

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
    done, _ = _wait(client, created.id)
    assert done.status == "completed" and done.error_file_id is None
    output = _lines(client, done.output_file_id)
    assert {cid: line["response"]["body"]["choices"][0]["message"]["content"] for cid, line in output.items()} == {
        "q0": "ORD-000000", "q1": "ORD-000001", "q2": "ORD-000002"}
    assert output["q0"]["response"]["body"]["model"] == "o-deployment"
    assert [b.status for b in client.batches.list()] == ["completed", "cancelled"]
    assert reasoner.stats()["batches_created"] == 2
