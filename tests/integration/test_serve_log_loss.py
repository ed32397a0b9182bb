"""A router replica SIGKILLed under load loses at most about one `serve.log_flush_s` of request-log
lines: 50 clients against the real serve app on a local Ray Serve (the fake teacher answers every
request), the replica's process killed mid-run, Serve restarting it, the logs read back after."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
import ray

from distill_ray.config import load_config
from distill_ray.serve.logs import read_logs
from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.helpers.net import free_port as _free_port
from tests.helpers.serve import save_student as _student

pytestmark = pytest.mark.usefixtures("ray_local")
TOKEN_ENV = "DISTILL_TEST_LOGLOSS_TOKEN"
ADMIN_ENV = "DISTILL_TEST_LOGLOSS_ADMIN"
TOKEN = "test-logloss-token-not-a-secret"  # noqa: S105 - a test's own token for its loopback server
ADMIN = "test-logloss-admin-not-a-secret"  # noqa: S105
CLIENTS = 50
FLUSH_S = 0.5
WRITE_SLACK_S = 0.5  # a batch taken off the queue just before the kill may still be on its way to disk
BEFORE_KILL_S = 4.0
AFTER_RESTART = 100  # answers, after the kill, from the restarted replica
AFTER_RESTART_S = 1.0  # and then this much more load
RESTART_LIMIT_S = 120.0


def _router_pid() -> tuple[str, int]:
    from ray.util.state import list_actors

    routers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
               if "ServeReplica" in a.class_name and "router" in a.class_name]
    assert len(routers) == 1, [a.class_name for a in routers]
    return routers[0].actor_id, routers[0].pid


def _serve_running() -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


async def _load(url: str, pid: int) -> dict:
    """50 clients until the restarted replica has answered AFTER_RESTART requests (and AFTER_RESTART_S
    more), with the router's process killed BEFORE_KILL_S in. Times by this process's clock."""
    answers: list[tuple[str, float, float]] = []  # (x-request-id, sent, answered)
    errors: dict[str, int] = {}
    kill: dict[str, float] = {}
    stop = asyncio.Event()

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"model": "m", "messages": [{"role": "user", "content": f"client {i} #{n}: ORD-3{i:05d}?"}],
                    "user": f"logloss-{i}", "max_tokens": 4}
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    await r.read()
                    if r.status == 200:
                        answers.append((r.headers["x-request-id"], sent, time.monotonic()))
                        continue
                    kind = f"HTTP {r.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                kind = type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            await asyncio.sleep(0.05)  # no busy loop against a replica that is restarting

    async def killer() -> None:
        await asyncio.sleep(BEFORE_KILL_S)
        kill["at"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = kill["at"] + RESTART_LIMIT_S
        while sum(sent > kill["at"] for _, sent, _ in answers) < AFTER_RESTART and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        kill["back"] = min((done for _, sent, done in answers if sent > kill["at"]), default=float("nan"))
        await asyncio.sleep(AFTER_RESTART_S)
        stop.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(killer(), *(client(i, session) for i in range(CLIENTS)))
    return {"answers": answers, "errors": errors, **kill}


async def _stats(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(
            f"{url}/distill/stats", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_a_killed_router_loses_at_most_one_flush_interval_of_log_lines(tmp_path):
    from ray import serve

    from distill_ray.serve.step import deploy, stop

    workdir = tmp_path / "run"
    _student(workdir)
    serve_was_running = _serve_running()
    os.environ.update({TOKEN_ENV: TOKEN, ADMIN_ENV: ADMIN})
    config = None
    try:
        with FakeTeacher(FakeTeacherConfig()) as teacher:
            config = load_config(None, [
                f"workdir={workdir}", f"teachers.0.base_url={teacher.base_url}", "teachers.0.launch=null",
                "teachers.0.max_tokens=8", "students=[{name: mini, base_model: unused}]", "serve.student=mini",
                "serve.engine.backend=transformers", "serve.mode=canary", "serve.canary_percent=0",
                "serve.skip_eval_gate=true", "serve.router_replicas=1", f"serve.port={_free_port()}",
                f"serve.auth_token_env={TOKEN_ENV}", f"serve.admin_token_env={ADMIN_ENV}",
                # batches larger than the run: the flush timer alone bounds what a dead replica loses
                f"serve.log_flush_s={FLUSH_S}", "serve.log_batch_size=4096", "task.metric=normalized_match"])
            deployed = deploy(config, echo=lambda _: None)
            actor_id, pid = _router_pid()
            run = asyncio.run(_load(deployed["url"], pid))
            time.sleep(FLUSH_S * 4)  # the restarted replica's last lines reach the disk
            restarted = _router_pid()
            log_stats = asyncio.run(_stats(deployed["url"]))["request_log"]
    finally:
        try:
            if config is not None:
                stop(config, echo=lambda _: None)
            if not serve_was_running:
                serve.shutdown()
        finally:
            for key in (TOKEN_ENV, ADMIN_ENV):
                os.environ.pop(key, None)

    answers, t_kill = run["answers"], run["at"]
    logged = {x["request_id"] for x in read_logs(Workdir(str(workdir)))}
    lost = [(rid, sent, done) for rid, sent, done in answers if rid not in logged]
    # The bound: answers completed within the last flush interval (+ a write's slack) before the kill,
    # and answers in flight at the kill (the router had logged them, the client had not got them yet).
    recent = sum(t_kill - FLUSH_S - WRITE_SLACK_S <= done <= t_kill for _, _, done in answers)
    in_flight = sum(sent <= t_kill < done for _, sent, done in answers)
    bound = recent + in_flight
    after = [a for a in answers if a[1] > t_kill]
    print(f"\nlog loss at a router SIGKILL ({CLIENTS} clients, log_flush_s={FLUSH_S}): answered {len(answers)}, "
          f"logged {len(logged)}, lost {len(lost)}, bound {bound} ({recent} answered in the last "
          f"{FLUSH_S + WRITE_SLACK_S:g} s before the kill + {in_flight} in flight at it); answered before the kill "
          f"{sum(done <= t_kill for _, _, done in answers)}, after the restart {len(after)}; first answer from the "
          f"restarted replica {run['back'] - t_kill:.1f} s after the kill; clients' errors {run['errors']}; "
          f"the restarted router's request_log stats {log_stats}")
    assert restarted[1] != pid, (actor_id, pid, restarted)  # Serve replaced the killed replica
    assert len(after) >= AFTER_RESTART, f"the restarted router answered {len(after)} requests"
    assert len(answers) - len(after) > 0
    # the restarted replica's own counters: every line it took is written, none dropped or failed
    assert log_stats["written"] >= len(after) and log_stats["queued"] == 0, log_stats
    assert (log_stats["dropped"], log_stats["write_failures"], log_stats["failed_lines"]) == (0, 0, 0), log_stats
    assert len(lost) <= bound, (len(lost), bound)
    # every lost line was the dead replica's: answered before the kill or in flight at it
    assert all(sent <= t_kill for _, sent, _ in lost), [x for x in lost if x[1] > t_kill][:5]
    # and lost lines are the latest ones: none answered long before the kill
    assert all(done >= t_kill - FLUSH_S - WRITE_SLACK_S for _, _, done in lost), sorted(
        t_kill - done for _, _, done in lost)[-5:]
