"""`distill-ray serve`, `distill-ray rollout` and `distill-ray serve --stats`.

`serve` picks the student (`serve.student`, else the smallest student that passed eval; in shadow
mode, where the student never answers a client, the best by relative quality even if none passed),
deploys the Serve app on the Ray cluster (a local one by default) at `serve.host:serve.port`, and
runs until Ctrl-C / SIGTERM, then deletes the app; `--detach` leaves it running on the cluster.
`rollout` changes the live app's mode, canary share or confidence threshold: it redeploys the app
with a new `user_config` only, which Serve applies to the running router replicas in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig
from distill_ray.errors import StepFailed
from distill_ray.manifest import read_manifest
from distill_ray.serve.app import APP_NAME
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

ROUTE_PREFIX = "/"


class ServeRefused(MissingInput):
    """Serving would be unsafe or impossible with this config (exit 2)."""


def pick_student(config: PipelineConfig, workdir: Workdir, mode: str) -> tuple[str, str, dict[str, Any] | None]:
    """(name, checkpoint URI, its eval result) of the student to serve."""
    metrics = None
    if workdir.exists("eval", "metrics.json"):
        metrics = json.loads(workdir.read_bytes("eval", "metrics.json"))
    results = (metrics or {}).get("students", {})
    if config.serve.student:
        name = config.serve.student
    else:
        if not results:
            raise ServeRefused(f"no eval results in {workdir.uri_of('eval')}: run `distill-ray eval` first, or name "
                               "serve.student")
        passed = [r for r in results.values() if r["passed"]]
        if passed:
            name = min(passed, key=lambda r: (r["parameters"], -r["quality"]["overall"]["relative_quality"]))["student"]
        elif mode == "shadow":
            name = max(results.values(), key=lambda r: r["quality"]["overall"]["relative_quality"])["student"]
        else:
            raise ServeRefused(f"no student passed eval, so none may answer clients in {mode} mode; serve in shadow "
                               "mode, or name serve.student to override")
    manifest = read_manifest(workdir, f"students/{name}")
    if not manifest or manifest.get("status") != "complete":
        raise ServeRefused(f"student '{name}' has no finished training in {workdir.uri_of('students', name)}")
    return name, workdir.uri_of("students", name, "best"), results.get(name)


def resolve_min_confidence(config: PipelineConfig, result: dict[str, Any] | None) -> float:
    """serve.min_confidence as a number: 'recommended' is eval's threshold for this student (no
    threshold needed: every answer served; none meets the bar: every answer falls back)."""
    value = config.serve.min_confidence
    if value != "recommended":
        return float(value)
    if not result:
        raise ServeRefused("serve.min_confidence: 'recommended' needs this student's eval results (run `distill-ray eval`)")
    threshold = result["threshold"]
    if not threshold["meets_bar"]:
        return 0.0
    return -1e9 if threshold["min_confidence"] is None else float(threshold["min_confidence"])


def app_args(config: PipelineConfig, student: str, uri: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config.model_copy(update={"serve": config.serve.model_copy(
        update={"min_confidence": resolve_min_confidence(config, result)})})
    s = config.serve
    token = os.environ.get(s.auth_token_env) if s.auth_token_env else None
    if s.auth_token_env and not token:
        raise ServeRefused(f"serve.auth_token_env: environment variable {s.auth_token_env} is not set (the bearer token "
                           "clients must send); set it, or set serve.auth_token_env: null for an open endpoint")
    return {"config": config.model_dump(mode="json", by_alias=True), "student_uri": uri, "student_name": student,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
            "rollout": {"mode": s.mode, "canary_percent": s.canary_percent, "min_confidence": s.min_confidence,
                        "latency_budget_ms": s.latency_budget_ms}}


def deploy(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Deploy (or update) the app on the connected Ray cluster; returns what was deployed."""
    from ray import serve

    from distill_ray.ray_env import init_ray
    from distill_ray.serve.app import build_app

    s = config.serve
    workdir = Workdir(config.workdir)
    name, uri, result = pick_student(config, workdir, s.mode)
    args = app_args(config, name, uri, result)
    init_ray()
    serve.start(http_options={"host": s.host, "port": s.port}, proxy_location=s.proxy_location)
    _reset_control()  # a fresh deployment starts from the config's rollout, not a previous run's
    t0 = time.perf_counter()
    serve.run(build_app(args), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    _wait_healthy(s.host, s.port, timeout_s=600)
    from distill_ray.serve.student import warm_up

    asyncio.run(warm_up(name, ray_llm=s.engine.backend == "vllm"))  # the first client pays no engine warm-up
    url = f"http://{s.host}:{s.port}/v1"
    quality = (f", relative quality {result['quality']['overall']['relative_quality']:.3f}, "
               f"{'passed' if result['passed'] else 'FAILED'} eval") if result else ""
    echo(f"serve: {url} ready in {time.perf_counter() - t0:.0f}s: student '{name}'{quality}; mode {s.mode}"
         + (f" ({s.canary_percent:g}% of users)" if s.mode == "canary" else "")
         + f"; fallback to teacher below confidence {args['rollout']['min_confidence']:g}; logs in "
           f"{workdir.uri_of('serve', 'logs')}")
    _record_rollout(workdir, args["rollout"], "serve", name)
    return {"url": url, "student": name, "checkpoint": uri, "rollout": args["rollout"]}


def run_serve(config: PipelineConfig, echo: Callable[[str], None] = print, detach: bool = False) -> dict[str, Any]:
    """`distill-ray serve`: deploy, then serve until interrupted (unless `detach`)."""
    from ray import serve

    deployed = deploy(config, echo)
    if detach:
        echo("serve: detached; the app keeps running on the cluster (`distill-ray serve --stop` removes it)")
        return deployed
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        echo("serve: stopping")
    finally:
        serve.delete(APP_NAME)
        _reset_control()
    return deployed


def stop(config: PipelineConfig, echo: Callable[[str], None] = print) -> None:
    from ray import serve

    from distill_ray.ray_env import init_ray

    init_ray()
    serve.delete(APP_NAME)
    _reset_control()
    echo("serve: app removed")


def rollout(config: PipelineConfig, mode: str | None, percent: float | None, min_confidence: float | None,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Change the live app's rollout in place (no restart); `--percent 0` is the instant rollback.

    Sent to the app over HTTP (`POST /v1/distill/rollout`, with the serve token), which sets the
    rollout control actor every router replica polls; then waits until the app reports it."""
    from distill_ray.serve.policy import Rollout

    workdir = Workdir(config.workdir)
    current = fetch_stats(config)["rollout"]
    changes = {k: v for k, v in (("mode", mode), ("canary_percent", percent), ("min_confidence", min_confidence))
               if v is not None}
    wanted = {**current, **changes}
    try:
        Rollout(**wanted)  # validates before anything changes
    except ValueError as exc:
        raise ServeRefused(f"rollout: {exc}") from None
    student, _ = _deployed_student(workdir)
    if wanted["mode"] != "shadow" and not config.serve.student:
        results = json.loads(workdir.read_bytes("eval", "metrics.json"))["students"] if workdir.exists(
            "eval", "metrics.json") else {}
        if not results.get(student, {}).get("passed"):
            raise ServeRefused(f"student '{student}' did not pass eval, so it may not answer clients in {wanted['mode']} "
                               "mode; name serve.student to override")
    _call(config, "/v1/distill/rollout", changes)
    _record_rollout(workdir, wanted, "rollout", student)
    _wait_for_rollout(config, wanted)
    echo(f"rollout: mode {wanted['mode']}, canary {wanted['canary_percent']:g}%, min_confidence "
         f"{wanted['min_confidence']:g} (was mode {current['mode']}, canary {current['canary_percent']:g}%)")
    return wanted


def _call(config: PipelineConfig, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or, with a body, POST) one of the app's JSON endpoints with the serve token."""
    s = config.serve
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{s.host}:{s.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    token = os.environ.get(s.auth_token_env) if s.auth_token_env else None
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise StepFailed(f"HTTP {err.code} from {request.full_url}: {err.read()[:300]!r}") from None
    except OSError as err:
        raise StepFailed(f"nothing answers at {request.full_url} ({err}); is `distill-ray serve` running?") from None


def _wait_for_rollout(config: PipelineConfig, wanted: dict[str, Any], timeout_s: float = 10) -> None:
    """Until the app reports the new rollout (routers poll every POLL_S)."""
    from distill_ray.serve.app import POLL_S

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            live = fetch_stats(config)["rollout"]
        except StepFailed:
            time.sleep(4 * POLL_S)  # stats not reachable from here: give the routers a few polls
            return
        if all(live.get(k) == v for k, v in wanted.items() if k in live):
            return
        time.sleep(POLL_S / 2)


def _reset_control() -> None:
    import ray

    from distill_ray.serve.app import control_actor

    control = control_actor()
    if control is not None:
        ray.kill(control, no_restart=True)


def fetch_stats(config: PipelineConfig) -> dict[str, Any]:
    return _call(config, "/v1/distill/stats")


def format_stats(stats: dict[str, Any]) -> str:
    r = stats["rollout"]
    lines = [f"student {stats['student']} / teacher {stats['teacher']}; mode {r['mode']}, canary {r['canary_percent']:g}%, "
             f"min_confidence {r['min_confidence']}",
             f"requests {stats['requests']}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["served_by"].items()))
             + f"; fallbacks {stats['fallbacks'] or 0} (rate {stats['fallback_rate']}); errors {stats['errors'] or 0}"]
    breaker = stats.get("student_breaker") or {}
    if breaker.get("state", "closed") != "closed" or breaker.get("opened"):
        lines.append(f"student circuit breaker: {breaker['state']} (opened {breaker['opened']} times)")
    for who, lat in sorted(stats["latency"].items()):
        lines.append(f"latency {who}: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms "
                     f"({lat['count']} requests)")
    for category, a in stats["shadow_agreement"].items():
        lines.append(f"shadow agreement {category}: {a['agreement']:.3f} over {a['requests']} requests")
    return "\n".join(lines)


def _wait_healthy(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://{host}:{port}/health"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.5)
    raise StepFailed(f"serve: the app did not answer {url} within {timeout_s:.0f}s (see the Serve logs)")


def _record_rollout(workdir: Workdir, rollout: dict[str, Any], by: str, student: str) -> None:
    """`serve/rollout.json`: the live rollout and its history (who changed what, when)."""
    history = []
    if workdir.exists("serve", "rollout.json"):
        history = json.loads(workdir.read_bytes("serve", "rollout.json")).get("history", [])
    entry = {**rollout, "student": student, "by": by, "time": time.time()}
    workdir.write_json({"current": entry, "history": [*history, entry][-200:]}, "serve", "rollout.json")


def _current(workdir: Workdir) -> dict[str, Any] | None:
    if not workdir.exists("serve", "rollout.json"):
        return None
    return json.loads(workdir.read_bytes("serve", "rollout.json"))["current"]


def _deployed_student(workdir: Workdir) -> tuple[str, str]:
    current = _current(workdir)
    if not current:
        raise ServeRefused(f"no record of the served student in {workdir.uri_of('serve', 'rollout.json')}")
    return current["student"], workdir.uri_of("students", current["student"], "best")
