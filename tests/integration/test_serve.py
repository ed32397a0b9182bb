"""`distill-ray serve` on a real local Ray Serve: a tiny student, the scripted fake teacher, the
official `openai` client, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest

from distill_ray.config import load_config
from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.serve.logs import read_logs
from distill_ray.storage import Workdir
from tests.fakes.openai_server import FakeTeacher, FakeTeacherConfig, answer_order_number
from tests.integration.test_offline_teacher import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("ray_local")
TOKEN_ENV = "DISTILL_TEST_SERVE_TOKEN"
TOKEN = "test-serve-token-not-a-secret"  # noqa: S105 - a test's own token for its loopback server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student(workdir: Path) -> None:
    """A finished (tiny, untrained) student in the workdir, as `distill-ray train` leaves it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), tokenizer.eos_token_id)
    best = workdir / "students" / "mini" / "best"
    model.save_pretrained(best)
    tokenizer.save_pretrained(best)
    write_manifest(Workdir(str(workdir)), StepRecord("students/mini", {}, {}))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The serve app in shadow mode in front of the fake teacher; removed at the end."""
    from ray import serve

    from distill_ray.serve.step import deploy

    workdir = tmp_path_factory.mktemp("serve") / "run"
    _student(workdir)
    os.environ[TOKEN_ENV] = TOKEN
    port = _free_port()
    with FakeTeacher(FakeTeacherConfig()) as teacher:
        config = load_config(None, [
            f"workdir={workdir}", f"teachers.0.base_url={teacher.base_url}", "teachers.0.launch=null",
            "teachers.0.max_tokens=8", "students=[{name: mini, base_model: unused}]", "serve.student=mini",
            f"serve.port={port}", f"serve.auth_token_env={TOKEN_ENV}", "serve.mode=shadow", "serve.log_batch_size=16",
            "task.metric=normalized_match"])
        deployed = deploy(config, echo=lambda _: None)
        try:
            yield {"config": config, "url": deployed["url"], "workdir": workdir, "teacher": teacher}
        finally:
            serve.delete("distill")
            serve.shutdown()
            os.environ.pop(TOKEN_ENV, None)


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
        while len(logs := [x for x in read_logs(Workdir(str(app["workdir"]))) if x["user"] == "streamer"]) < 3:
            assert time.monotonic() < deadline, logs
            time.sleep(0.3)
        streamed = [x for x in logs if "first_token_ms" in x]
        assert len(streamed) == 1 and streamed[0]["first_token_ms"] <= streamed[0]["latency_ms"], logs
        assert streamed[0]["answer"] == "".join(pieces).strip()  # the log has what the client was sent
        assert all(x["student_confidence"] is not None and x["student_confidence"] <= 0 for x in logs), logs
    finally:
        _rollout(app, mode="shadow", percent=0, min_confidence=-0.3)


def test_unsure_or_dead_student_falls_back_to_the_teacher(app):
    import ray
    from ray.util.state import list_actors

    from distill_ray.serve.step import fetch_stats, format_stats

    _rollout(app, mode="full", min_confidence=0.0)  # no answer is that sure: every one falls back
    try:
        out = asyncio.run(_send(app["url"], [f"unsure-{i}" for i in range(10)], concurrency=4))
        assert {(r["status"], r["served_by"], r["reason"]) for r in out} == {(200, "teacher", "low_confidence")}
        _rollout(app, min_confidence=-1000.0)
        assert {r["served_by"] for r in asyncio.run(_send(app["url"], ["sure-1", "sure-2"]))} == {"student"}
        killed_reasons = ("student_error", "latency_budget", "student_unavailable")
        before = fetch_stats(app["config"])["fallbacks"]
        scraped_before = {r: _prometheus("distill_serve_fallbacks_total", reason=r) for r in killed_reasons}
        low = _wait_for(lambda: _prometheus("distill_serve_fallbacks_total", reason="low_confidence"), 10)
        assert low >= 10  # the unsure answers above, counted by reason in Ray's Prometheus export
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
        teacher_answers = 10 + len(failed_over)
        assert _wait_for(lambda: _prometheus("distill_serve_requests_total", served_by="teacher", mode="full"),
                         teacher_answers) >= teacher_answers
        assert _wait_for(lambda: _prometheus("distill_serve_latency_ms_count", served_by="teacher"),
                         teacher_answers) >= teacher_answers
        assert _wait_for(lambda: _prometheus("distill_serve_student_uncertainty_count"), 12) >= 12
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
