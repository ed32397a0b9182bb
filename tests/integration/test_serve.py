"""`distill-ray serve` on a real local Ray Serve: a tiny student, the scripted fake teacher, the
official `openai` client, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest

from distill_ray.config import load_config
from distill_ray.serve.logs import read_logs
from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig, answer_order_number, prompt_key
from tests.helpers.net import free_port as _free_port
from tests.helpers.serve import ADMIN, ADMIN_ENV, TOKEN, TOKEN_ENV
from tests.helpers.serve import save_student as _student
from tests.helpers.serve import write_eval_result as _eval_result

pytestmark = pytest.mark.usefixtures("ray_local")
BAD_JSON = "ORD-999999"  # the fake teacher answers this prompt with a body that is not JSON


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The serve app in shadow mode in front of the fake teacher; removed at the end."""
    from ray import serve

    from distill_ray.serve.step import _reset_control, deploy

    workdir = tmp_path_factory.mktemp("serve") / "run"
    _student(workdir)
    os.environ[TOKEN_ENV], os.environ[ADMIN_ENV] = TOKEN, ADMIN
    port = _free_port()
    with FakeTeacher(FakeTeacherConfig(faults={BAD_JSON: ["malformed"] * 3})) as teacher:
        config = load_config(None, [
            f"workdir={workdir}", f"teachers.0.base_url={teacher.base_url}", "teachers.0.launch=null",
            "teachers.0.max_tokens=8", "students=[{name: mini, base_model: unused}]", "serve.student=mini",
            f"serve.port={port}", f"serve.auth_token_env={TOKEN_ENV}", f"serve.admin_token_env={ADMIN_ENV}",
            "serve.mode=shadow", "serve.log_batch_size=16", "serve.categories=[orders, billing]", "serve.max_tokens=64",
            "task.metric=normalized_match"])
        deployed = deploy(config, echo=lambda _: None)
        try:
            yield {"config": config, "url": deployed["url"], "workdir": workdir, "teacher": teacher}
        finally:
            serve.delete("distill")
            serve.shutdown()
            _reset_control()  # the app's detached rollout control goes with it
            os.environ.pop(TOKEN_ENV, None)
            os.environ.pop(ADMIN_ENV, None)


def _client(app, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=app["url"], api_key=key, max_retries=0, timeout=60)


MESSAGE = "Hi, where is my order ORD-512874? It was due Monday."


def _rollout(app, **changes):
    from distill_ray.serve.step import rollout

    rollout(app["config"], changes.get("mode"), changes.get("percent"), changes.get("min_confidence"),
            echo=lambda _: None)


def _wait_logs(workdir: Path, count: int, timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = read_logs(Workdir(str(workdir)))
        if len(logs) >= count:
            return logs
        time.sleep(0.3)
    return read_logs(Workdir(str(workdir)))


def test_openai_client_chat_and_streaming_in_shadow_mode(app):
    """A teacher client switches by base_url and api_key only; in shadow mode the teacher answers
    and the student's answer is logged next to it."""
    client = _client(app)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-whatever", messages=[{"role": "user", "content": MESSAGE}], user="alice")
    chat = raw.parse()
    assert raw.headers["x-served-by"] == "teacher" and "x-fallback-reason" not in raw.headers
    assert chat.choices[0].message.content == answer_order_number(MESSAGE) == "ORD-512874"
    assert chat.usage.total_tokens > 0
    stream = client.chat.completions.create(model="gpt-whatever", messages=[{"role": "user", "content": MESSAGE}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "ORD-512874"
    assert {m.id for m in client.models.list()} == {"mini", app["config"].teachers[0].model}
    logs = _wait_logs(app["workdir"], 2)
    line = next(x for x in logs if x["user"] == "alice")
    assert line["served_by"] == "teacher" and line["answer"] == "ORD-512874" and line["mode"] == "shadow"
    assert line["student_answer"] is not None and line["shadow_agreement"] in (0.0, 1.0)
    assert line["prompt"] == [{"role": "user", "content": MESSAGE}]


def test_auth_and_bad_requests_get_openai_errors(app):
    with pytest.raises(openai.AuthenticationError):
        _client(app, key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        _client(app).chat.completions.create(model="m", messages=[])

    async def post(body: bytes) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s, s.post(f"{app['url']}/chat/completions", data=body, headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    status, body = asyncio.run(post(b"{not json"))
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 70000}]}).encode()
    status, body = asyncio.run(post(big))
    assert status == 413 and "max_request_bytes" in body["error"]["message"]


def _http(app, method: str, path: str, body=None, token: str | None = TOKEN, headers: dict | None = None):
    """(status, JSON body, headers) of one raw request to the app."""
    async def go():
        h = {"Content-Type": "application/json", **(headers or {})}
        if token:
            h["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, (bytes, type(None))) or callable(body) else json.dumps(body).encode()
        if callable(data):
            data = data()
        async with aiohttp.ClientSession() as s, s.request(method, app["url"].removesuffix("/v1") + path, data=data,
                                                            headers=h) as r:
            return r.status, await r.json(content_type=None), {k.lower(): v for k, v in r.headers.items()}
    return asyncio.run(go())


def test_control_endpoints_take_the_admin_token_only(app):
    """The rollout and stats endpoints refuse the API clients' token (403) and no token (401)."""
    for path, method, body in (("/v1/distill/rollout", "POST", {"canary_percent": 0}),
                               ("/v1/distill/stats", "GET", None)):
        status, answer, _ = _http(app, method, path, body, token=TOKEN)
        assert status == 403 and answer["error"]["code"] == "admin_only", answer
        assert _http(app, method, path, body, token=None)[0] == 401
        assert _http(app, method, path, body, token="wrong")[0] == 401
        assert _http(app, method, path, body, token=ADMIN)[0] == 200
    with pytest.raises(openai.AuthenticationError):  # nor does the admin token open anything to a wrong one
        _client(app, key="wrong").models.list()


def test_bad_rollout_values_are_400_and_the_app_keeps_serving(app):
    before = _http(app, "GET", "/v1/distill/stats", token=ADMIN)[1]["rollout"]
    for bad in ({"min_confidence": "x"}, {"canary_percent": 120}, {"canary_percent": "25"}, {"mode": "bogus"},
                {"latency_budget_ms": -1}, {"min_confidence": 0.5}, {"nope": 1}, {"min_confidence": None}, [], {},
                {"plan": "resume"}, b"{not json"):
        status, answer, _ = _http(app, "POST", "/v1/distill/rollout", bad, token=ADMIN)
        assert status == 400 and answer["error"]["message"].startswith("rollout"), (bad, status, answer)
    assert _http(app, "GET", "/v1/distill/stats", token=ADMIN)[1]["rollout"] == before  # nothing changed
    chat = _client(app).chat.completions.create(model="m", messages=[{"role": "user", "content": MESSAGE}])
    assert chat.choices[0].message.content == "ORD-512874"  # and the app still serves


def test_the_server_enforces_the_eval_gate(app):
    """A student that did not pass eval may not answer clients, whoever asks the app (not only the CLI)."""
    from distill_ray.serve.step import ServeRefused

    _eval_result(app["workdir"], passed=False)
    try:
        status, answer, _ = _http(app, "POST", "/v1/distill/rollout", {"mode": "canary", "canary_percent": 5},
                                  token=ADMIN)
        assert status == 409 and answer["error"]["code"] == "eval_gate" and "did not pass eval" in answer["error"]["message"]
        with pytest.raises(ServeRefused, match="did not pass eval"):
            _rollout(app, mode="full")
        assert _http(app, "GET", "/v1/distill/stats", token=ADMIN)[1]["rollout"]["mode"] == "shadow"
    finally:
        _eval_result(app["workdir"], passed=True)
    status, _, _ = _http(app, "POST", "/v1/distill/rollout", {"mode": "canary", "canary_percent": 5}, token=ADMIN)
    assert status == 200
    _rollout(app, mode="shadow", percent=0)


def _nested(depth: int) -> bytes:
    return (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": '
            + b"[" * depth + b"]" * depth + b"}}")


def test_every_bad_request_gets_its_4xx_and_is_logged(app):
    msg = [{"role": "user", "content": "where is ORD-100200?"}]
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 70000}]}).encode()

    async def chunked():  # no content-length: the size is only known as the body arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    cases = {
        "max_tokens 0": ({"model": "m", "messages": msg, "max_tokens": 0}, 400, "max_tokens"),
        "max_tokens -5": ({"model": "m", "messages": msg, "max_tokens": -5}, 400, "max_tokens"),
        "max_tokens over the cap": ({"model": "m", "messages": msg, "max_completion_tokens": 65}, 400, "serve.max_tokens"),
        "an image part": ({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
            400, "text parts only"),
        "n=2": ({"model": "m", "messages": msg, "n": 2}, 400, "n=1"),
        "tools": ({"model": "m", "messages": msg, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
                  "tools"),
        "response_format": ({"model": "m", "messages": msg, "response_format": {"type": "json_object"}}, 400,
                            "response_format"),
        "nested 40 deep": (_nested(40), 400, "serve.max_json_depth"),
        "nested 5000 deep": (_nested(5000), 400, "serve.max_json_depth"),
        "chunked oversize": (chunked, 413, "max_request_bytes"),
        "teacher not JSON": ({"model": "m", "messages": [{"role": "user", "content": f"and {BAD_JSON}?"}]}, 502,
                             "not a chat completion"),
    }
    ids = {}
    for name, (body, want, words) in cases.items():
        status, answer, headers = _http(app, "POST", "/v1/chat/completions", body)
        assert status == want and words in answer["error"]["message"], (name, status, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}  # OpenAI's shape
        ids[name] = headers["x-request-id"]
    # the teacher's broken 200 is never asked again (it is paid for): one attempt, then the 502
    bad_key = prompt_key([{"role": "user", "content": f"and {BAD_JSON}?"}])
    assert app["teacher"].stats()["attempts_per_prompt"][bad_key] == 1
    status, answer, headers = _http(app, "POST", "/v1/chat/completions", {"model": "m", "messages": msg},
                                    headers={"x-category": "x" * 500})
    assert status == 200
    ids["unknown category"] = headers["x-request-id"]
    # The app keeps serving; every error is in the request logs, with its status and message.
    logs = {x["request_id"]: x for x in _wait_logs(app["workdir"], 0, timeout_s=0)}
    deadline = time.monotonic() + 20
    while not set(ids.values()) <= set(logs) and time.monotonic() < deadline:
        time.sleep(0.3)
        logs = {x["request_id"]: x for x in read_logs(Workdir(str(app["workdir"])))}
    for name, (_, want, _) in cases.items():
        assert logs[ids[name]]["status"] == want and logs[ids[name]]["error"], name
    assert logs[ids["teacher not JSON"]]["teacher"]["error"].startswith("unreadable answer")
    line = logs[ids["unknown category"]]  # an unknown x-category is counted as `other`, never a new label
    assert (line["status"], line["category"]) == (200, "other")
    assert _wait_for(lambda: _prometheus("distill_serve_requests_total", category="other"), 1) >= 1
    assert not _prometheus("distill_serve_requests_total", category="x" * 500)


async def _send(url: str, users: list[str], concurrency: int = 16, category: str | None = None) -> list[dict]:
    """One request per user; returns served_by / fallback reason / status per request."""
    out: list[dict] = []
    queue = list(users)

    async def worker(session: aiohttp.ClientSession):
        while queue:
            user = queue.pop()
            headers = {"Authorization": f"Bearer {TOKEN}", "x-user-id": user}
            if category:
                headers["x-category"] = category
            body = {"model": "m", "messages": [{"role": "user", "content": f"{user}: where is ORD-100{len(user):03d}?"}],
                    "max_tokens": 4}
            async with session.post(f"{url}/chat/completions", json=body, headers=headers) as r:
                await r.read()
                out.append({"user": user, "status": r.status, "served_by": r.headers.get("x-served-by"),
                            "reason": r.headers.get("x-fallback-reason")})

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return out


def test_canary_is_sticky_25_percent_and_zero_is_the_rollback(app):
    _rollout(app, mode="canary", percent=25, min_confidence=-1000.0)  # every student answer is served
    try:
        users = [f"user-{i}" for i in range(1000)]
        first = asyncio.run(_send(app["url"], users))
        assert all(r["status"] == 200 for r in first)
        share = sum(r["served_by"] == "student" for r in first) / len(first)
        assert 0.21 <= share <= 0.29, share
        path = {r["user"]: r["served_by"] for r in first}
        again = asyncio.run(_send(app["url"], users[:200]))
        assert all(path[r["user"]] == r["served_by"] for r in again)  # each user always on one path
        from distill_ray.serve.step import ServeRefused

        with pytest.raises(ServeRefused, match="canary_percent"):
            _rollout(app, percent=120)  # refused before anything changes
        _rollout(app, percent=0)  # the instant rollback, on the live replicas
        back = asyncio.run(_send(app["url"], users[:200]))
        assert all(r["served_by"] == "teacher" for r in back)
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


def _prometheus(name: str, **labels: str) -> float:
    """The sum of a metric's series on this node's Prometheus endpoint (Ray's metrics export), as a
    Prometheus server scraping the node would read them."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"ray_{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _wait_for(read, want: float, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (got := read()) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def test_student_streams_as_it_decodes_and_an_unsure_stream_is_the_teachers(app):
    """The student (vLLM) streams for real: the judged first tokens, then each piece as it is decoded;
    joined, they are the same greedy answer as the plain request. An unsure stream falls back whole."""
    client = _client(app)
    messages = [{"role": "user", "content": MESSAGE}]
    _rollout(app, mode="full", min_confidence=-1000.0)
    try:
        plain = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=48,
                                                                  user="streamer")
        assert plain.headers["x-served-by"] == "student"
        whole = plain.parse().choices[0].message.content
        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=48,
                                                                stream=True, user="streamer")
        assert raw.headers["x-served-by"] == "student"
        pieces = [c.choices[0].delta.content for c in raw.parse() if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1, pieces  # not one chunk after the whole answer
        assert whole and "".join(pieces).strip()  # (the untrained tiny model's greedy answers are near ties in
        # bf16: a prefix-cached second request may take another token, so the texts are not compared)
        _rollout(app, min_confidence=0.0)  # no answer is that sure
        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=48,
                                                                stream=True, user="streamer")
        assert (raw.headers["x-served-by"], raw.headers["x-fallback-reason"]) == ("teacher", "low_confidence")
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == "ORD-512874"
        deadline = time.monotonic() + 20
        while len(logs := [x for x in read_logs(Workdir(str(app["workdir"]))) if x.get("user") == "streamer"]) < 3:
            assert time.monotonic() < deadline, logs
            time.sleep(0.3)
        streamed = [x for x in logs if "first_token_ms" in x]
        assert len(streamed) == 1 and streamed[0]["first_token_ms"] <= streamed[0]["latency_ms"], logs
        assert streamed[0]["answer"] == "".join(pieces).strip()  # the log has what the client was sent
        assert all(x["student_confidence"] is not None and x["student_confidence"] <= 0 for x in logs), logs
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


def test_an_unsure_student_falls_back_to_the_teacher(app):
    _rollout(app, mode="full", min_confidence=0.0)  # no answer is that sure: every one falls back
    try:
        out = asyncio.run(_send(app["url"], [f"unsure-{i}" for i in range(10)], concurrency=4))
        assert {(r["status"], r["served_by"], r["reason"]) for r in out} == {(200, "teacher", "low_confidence")}
        _rollout(app, min_confidence=-1000.0)
        assert {r["served_by"] for r in asyncio.run(_send(app["url"], ["sure-1", "sure-2"]))} == {"student"}
        low = _wait_for(lambda: _prometheus("distill_serve_fallbacks_total", reason="low_confidence"), 10)
        assert low >= 10  # the unsure answers above, counted by reason in Ray's Prometheus export
        assert _wait_for(lambda: _prometheus("distill_serve_requests_total", served_by="teacher", mode="full"),
                         10) >= 10
        assert _wait_for(lambda: _prometheus("distill_serve_student_uncertainty_count"), 12) >= 12
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


@pytest.mark.slow  # the killed replica's replacement starts a vLLM engine of its own (about 60 s here)
def test_a_dead_student_replica_falls_back_to_the_teacher_until_it_is_replaced(app):
    import ray
    from ray.util.state import list_actors

    from distill_ray.serve.step import fetch_stats, format_stats

    _rollout(app, mode="full", min_confidence=-1000.0)
    try:
        killed_reasons = ("student_error", "latency_budget", "student_unavailable")
        before = fetch_stats(app["config"])["fallbacks"]
        scraped_before = {r: _prometheus("distill_serve_fallbacks_total", reason=r) for r in killed_reasons}
        teacher_before = _prometheus("distill_serve_requests_total", served_by="teacher", mode="full")
        latency_before = _prometheus("distill_serve_latency_ms_count", served_by="teacher")
        # Kill the student replica while serving: requests keep succeeding through the teacher.
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "student" in (a.class_name or "")
                    and "ServeReplica" in (a.class_name or "")]
        assert replicas
        for replica in replicas:
            ray.kill(ray.get_actor(replica.name, namespace="serve"), no_restart=False)
        out = asyncio.run(_send(app["url"], [f"dead-{i}" for i in range(20)], concurrency=4))
        assert all(r["status"] == 200 for r in out)
        failed_over = [r for r in out if r["served_by"] == "teacher"]
        reasons = Counter(r["reason"] for r in failed_over)
        # A dead replica fails its calls or keeps them waiting (for its replacement) past the latency
        # budget; after serve.breaker_failures of those in a row the router stops calling it for a while.
        assert failed_over and set(reasons) <= set(killed_reasons), reasons
        assert reasons["student_unavailable"] > 0, reasons  # the breaker spared those requests the wait
        stats = fetch_stats(app["config"])
        assert stats["student_breaker"]["opened"] >= 1
        assert "student circuit breaker: " in format_stats(stats)  # what `distill-ray serve --stats` prints
        for reason, count in reasons.items():
            assert stats["fallbacks"][reason] - before.get(reason, 0) == count, (reason, stats["fallbacks"])
            # ... and in Ray's Prometheus export, as the dashboard reads them
            want = scraped_before[reason] + count
            assert _wait_for(lambda r=reason: _prometheus("distill_serve_fallbacks_total", reason=r), want) == want
        want = teacher_before + len(failed_over)
        assert _wait_for(lambda: _prometheus("distill_serve_requests_total", served_by="teacher", mode="full"),
                         want) >= want
        want = latency_before + len(failed_over)
        assert _wait_for(lambda: _prometheus("distill_serve_latency_ms_count", served_by="teacher"), want) >= want
        # Serve replaces the replica; once the breaker's trial request succeeds, the student answers again.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if asyncio.run(_send(app["url"], ["back-1"]))[0]["served_by"] == "student":
                break
            time.sleep(1)
        else:
            raise AssertionError("the student never answered again after its replica was replaced")
        assert fetch_stats(app["config"])["student_breaker"]["state"] == "closed"
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


def test_concurrent_clients_get_no_errors_and_every_request_is_logged(app):
    """Half the users on the student (canary 50%), the rest on the teacher; the student's overload
    (one replica, one CPU) shows as latency-budget fallbacks, never as errors."""
    duration = float(os.environ.get("DISTILL_SERVE_LOAD_S", "10"))
    clients = int(os.environ.get("DISTILL_SERVE_LOAD_CLIENTS", "200"))
    _rollout(app, mode="canary", percent=50, min_confidence=-1000.0)
    try:
        _load(app, duration, clients)
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


def _load(app, duration: float, clients: int) -> None:
    run = f"load-{uuid.uuid4().hex[:6]}-"  # this run's users, apart from other tests' in the same logs

    async def load() -> list[int]:
        statuses: list[int] = []
        deadline = time.monotonic() + duration

        async def client(i: int, session: aiohttp.ClientSession):
            n = 0
            while time.monotonic() < deadline and n < 1000:
                n += 1
                body = {"model": "m", "messages": [{"role": "user", "content": f"client {i}: ORD-2{i:05d}?"}],
                        "user": f"{run}{i}", "max_tokens": 4}
                async with session.post(f"{app['url']}/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    await r.read()
                    statuses.append(r.status)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            await asyncio.gather(*(client(i, session) for i in range(clients)))
        return statuses

    statuses = asyncio.run(load())
    assert statuses and set(statuses) == {200}
    deadline = time.monotonic() + 60
    while True:  # the logs are written in batches off the hot path: wait for the last batch
        logged = [x for x in read_logs(Workdir(str(app["workdir"]))) if (x.get("user") or "").startswith(run)]
        if len(logged) >= len(statuses) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(logged) == len(statuses) and len({x["request_id"] for x in logged}) == len(statuses)
    served = Counter((x["served_by"], x.get("fallback_reason")) for x in logged)
    assert served[("student", None)] > 0 and served[("teacher", None)] > 0, served
    print(f"\n{clients} clients for {duration:g} s: {len(statuses)} requests, all 200, all logged; "
          f"(served by, fallback reason): {dict(served)}")


@pytest.mark.slow
def test_200_clients_for_60_seconds(app, monkeypatch):
    monkeypatch.setenv("DISTILL_SERVE_LOAD_S", "60")
    test_concurrent_clients_get_no_errors_and_every_request_is_logged(app)


def test_every_series_the_grafana_dashboard_charts_is_in_a_real_scrape(app):
    """monitoring/grafana-dashboard.json against Ray's Prometheus endpoint after the traffic above: every
    metric a panel queries exists, with the labels it groups by and the values it matches."""
    import ray

    from tests.conftest import ROOT

    asyncio.run(_send(app["url"], [f"slice-{i}" for i in range(4)], category="orders"))
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    port = ray._private.worker.global_worker.node.metrics_export_port
    missing: list[str] = []
    deadline = time.monotonic() + 30
    while True:  # Ray's metrics agent exports what the replicas recorded every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        series: dict[str, list[dict[str, str]]] = {}
        for line in text.splitlines():
            match = re.match(r"(ray_distill_serve_\w+)\{(.*)\} \S+$", line)
            if match:
                series.setdefault(match.group(1), []).append(dict(re.findall(r'(\w+)="([^"]*)"', match.group(2))))
        missing = []
        for expr in exprs:
            for name, matchers in re.findall(r"(ray_distill_serve_\w+)(\{[^}]*\})?", expr):
                found = series.get(name, [])
                wanted = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
                if not any(all(s.get(k) == v for k, v in wanted.items()) for s in found):
                    missing.append(f"{name}{matchers or ''}")
            for labels in re.findall(r"by \(([^)]*)\)", expr):
                for label in (x.strip() for x in labels.split(",")):
                    names = re.findall(r"ray_distill_serve_\w+", expr)
                    if label != "le" and not any(label in s for n in names for s in series.get(n, [])):
                        missing.append(f"label {label} of {names}")
        slices = {s.get("category") for s in series.get("ray_distill_serve_requests_total", [])}
        if not missing and "orders" in slices or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
    assert {"orders", "unknown"} <= slices, slices  # the slices sent above, each its own series


def test_rollout_plan_advances_a_good_student_and_pulls_back_one_that_degrades(app):
    """serve.rollout_plan [shadow, 5, 25, 100] drives itself from the live metrics: a good student
    reaches 100%; once it degrades (its replica killed: the test's fault switch) the plan steps back
    within the guardrail's window and holds, each decision with its figures in `serve --stats` and
    serve/rollout.json. Last in the module: it leaves the student replica restarting.

    The redeploy restarts the student's replica (Serve gives every redeployed deployment a new
    version), so the student here answers through the transformers engine, which starts in seconds
    where vLLM takes about a minute on 2 cores: the plan judges the router's figures, whatever engine
    answered (the vLLM student's own fallbacks are the tests above)."""
    import ray
    from ray.util.state import list_actors

    from distill_ray.serve.policy import BUCKETS, bucket
    from distill_ray.serve.step import deploy, fetch_stats, format_stats

    window = 8
    raw = app["config"].model_dump(mode="json")
    raw["serve"].update({"rollout_plan": ["shadow", 5, 25, 100], "min_confidence": -1000.0, "guardrails": {
        "min_requests": window, "window_requests": window, "max_fallback_rate": 0.3, "max_error_rate": 0.1,
        "min_shadow_agreement": None, "max_p95_ms": None}})
    raw["serve"]["engine"]["backend"] = "transformers"
    config = type(app["config"]).model_validate(raw)  # validated as a config file would be
    deploy(config, echo=lambda _: None)
    salt = config.name

    def users(percent: float, prefix: str) -> list[str]:  # users the stage routes to the student
        picked = (f"{prefix}-{i}" for i in range(100000))
        return [u for u in picked if bucket(u, salt) < percent * BUCKETS / 100][:window]

    def wait_stage(label: str) -> dict:
        deadline = time.monotonic() + 30
        while (stats := fetch_stats(config))["plan"]["stage"] != label:
            assert time.monotonic() < deadline, format_stats(stats)
            time.sleep(0.2)
        return stats

    assert fetch_stats(config)["plan"]["stage"] == "shadow"
    asyncio.run(_send(app["url"], [f"plan-shadow-{i}" for i in range(window)], concurrency=4))
    for stage, percent in (("5%", 5), ("25%", 25), ("100%", 100)):
        stats = wait_stage(stage)
        assert stats["rollout"]["canary_percent"] == percent
        out = asyncio.run(_send(app["url"], users(percent, f"plan-{percent}"), concurrency=4))
        assert {(r["status"], r["served_by"]) for r in out} == {(200, "student")}, out
    stats = fetch_stats(config)
    assert stats["plan"]["stage"] == "100%" and stats["rollout"]["mode"] == "full"
    assert [d["action"] for d in stats["plan"]["decisions"]] == ["advance"] * 3
    # The fault switch: the student's replica dies; its answers now fall back.
    for replica in [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "student" in (a.class_name or "")
                    and "ServeReplica" in (a.class_name or "")]:
        ray.kill(ray.get_actor(replica.name, namespace="serve"), no_restart=False)
    failing = 0
    while fetch_stats(config)["plan"]["stage"] == "100%":
        out = asyncio.run(_send(app["url"], [f"plan-dead-{failing}"], concurrency=1))
        assert out[0]["status"] == 200 and out[0]["served_by"] == "teacher", out  # the safety net holds
        failing += 1
        assert failing <= window, "not pulled back within the guardrail's window"
        time.sleep(0.6)  # two of the routers' syncs with the control
    stats = fetch_stats(config)
    step_back = stats["plan"]["decisions"][-1]
    assert (step_back["action"], step_back["from"], step_back["to"]) == ("step_back", "100%", "25%"), step_back
    assert stats["plan"]["held"] and stats["rollout"] == {**stats["rollout"], "mode": "canary", "canary_percent": 25.0}
    assert "error rate" in step_back["reason"] or "fallback rate" in step_back["reason"]
    printed = format_stats(stats)
    assert "step_back 100% -> 25%" in printed and "held:" in printed
    history = json.loads((app["workdir"] / "serve" / "rollout.json").read_text())["history"]
    assert [h["decision"]["action"] for h in history if "decision" in h][-4:] == ["advance"] * 3 + ["step_back"]
    print(f"\nrollout plan: advanced shadow -> 100% on {window} requests a stage; pulled back after {failing} failing "
          f"requests: {step_back['reason']} {step_back['figures']}")
