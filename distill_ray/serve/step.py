"""`distill-ray serve`, `distill-ray rollout` and `distill-ray serve --stats`.

`serve` picks the student (`serve.student`, else the smallest student that passed eval; in shadow
mode, where the student never answers a client, the best by relative quality even if none passed),
deploys the Serve app on the Ray cluster (a local one by default) at `serve.host:serve.port`, and
runs until Ctrl-C / SIGTERM, then deletes the app; `--detach` leaves it running on the cluster.
`rollout` changes the live app's mode, canary share or confidence threshold in place: it posts
the change to the app's admin endpoint, whose control actor every router replica follows.
What is deployed (the student, the eval gate, the app's arguments) is `deployment.py`'s.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig, Rollout
from distill_ray.errors import StepFailed
from distill_ray.serve.control import APP_NAME, POLL_S, control_actor, record_rollout
from distill_ray.serve.deployment import ServeRefused, app_args, pick_student, promoted
from distill_ray.storage import Workdir

ROUTE_PREFIX = "/"


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
    record_rollout(workdir, args["rollout"], "serve", name)  # before the app's control records its own
    serve.run(build_app(args), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    _wait_healthy(s.host, s.port, timeout_s=600)
    from distill_ray.serve.student import warm_up

    asyncio.run(warm_up(name, ray_llm=s.engine.backend == "vllm"))  # the first client pays no engine warm-up
    url = f"http://{s.host}:{s.port}/v1"
    quality = (f", relative quality {result['quality']['overall']['relative_quality']:.3f}, "
               f"{'passed' if result['passed'] else 'FAILED'} eval") if result else ""
    plan = (f"; rollout plan {' -> '.join(stage.label for stage in s.rollout_plan)}, from its first stage"
            if s.rollout_plan else "")
    adapter = " (its LoRA adapter on its base)" if s.student_adapter else ""
    echo(f"serve: {url} ready in {time.perf_counter() - t0:.0f}s: student '{name}'{adapter}{quality}; "
         + (plan[2:] if plan else f"mode {s.mode}" + (f" ({s.canary_percent:g}% of users)" if s.mode == "canary" else ""))
         + f"; fallback to teacher below confidence {args['rollout']['min_confidence']:g}; logs in "
           f"{workdir.uri_of('serve', 'logs')}")
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
            echo: Callable[[str], None] = print, plan: str | None = None) -> dict[str, Any]:
    """Change the live app's rollout in place (no restart); `--percent 0` is the instant rollback;
    `plan` ('pause' or 'resume') steers serve.rollout_plan.

    Sent to the app over HTTP (`POST /v1/distill/rollout`, with the admin token). The app validates
    the values with the config's own `Rollout` and enforces the eval gate; this only checks first,
    to say what is wrong before anything is sent."""
    changes = {k: v for k, v in (("mode", mode), ("canary_percent", percent), ("min_confidence", min_confidence))
               if v is not None}
    # The given values first, before the app is asked anything (a bad one is exit 2 with or without an app);
    # serve:'s values stand in for the ones not given ('recommended' is resolved by the app: 0.0 stands in).
    configured = {k: getattr(config.serve, k) for k in Rollout.model_fields}
    if not isinstance(configured["min_confidence"], float | int):
        configured["min_confidence"] = 0.0
    _valid_rollout({**configured, **changes})
    current = fetch_stats(config)["rollout"]
    if plan is not None:
        answer = _call(config, "/v1/distill/rollout", {"plan": plan})
        status = answer.get("plan") or {}
        echo(f"rollout: plan {plan}d at stage {status.get('stage')} (mode {answer['rollout']['mode']}, canary "
             f"{answer['rollout']['canary_percent']:g}%)")
        return answer["rollout"]
    wanted = _valid_rollout({**current, **changes})  # validated before anything changes
    try:
        answer = _call(config, "/v1/distill/rollout", changes)
    except StepFailed as exc:
        if "HTTP 409" in str(exc) or "HTTP 400" in str(exc):
            raise ServeRefused(f"rollout refused by the app: {exc}") from None
        raise
    _wait_for_rollout(config, wanted)  # the app's control actor records it in serve/rollout.json
    echo(f"rollout: mode {wanted['mode']}, canary {wanted['canary_percent']:g}%, min_confidence "
         f"{wanted['min_confidence']:g} (was mode {current['mode']}, canary {current['canary_percent']:g}%)"
         + ("; the rollout plan is paused (`distill-ray rollout --plan resume` re-arms it)"
            if (answer.get("plan") or {}).get("held") else ""))
    return wanted


def _valid_rollout(values: dict[str, Any]) -> dict[str, Any]:
    """The rollout these values make, or ServeRefused (exit 2) naming each bad one."""
    from pydantic import ValidationError

    try:
        return Rollout.model_validate(values).model_dump()
    except ValidationError as exc:
        raise ServeRefused("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                                   for e in exc.errors())) from None


def hand_to_rollout(config: PipelineConfig, name: str, uri: str, echo: Callable[[str], None] = print) -> bool:
    """A new student (the flywheel's) for the live app: redeployed to start again at the rollout
    plan's first stage (shadow mode without a plan). False when no app is live: the next
    `distill-ray serve` picks it (flywheel/promoted.json)."""
    try:
        _wait_healthy(config.serve.host, config.serve.port, timeout_s=2)
    except StepFailed:
        echo(f"serve: no live app at {config.serve.host}:{config.serve.port}; `distill-ray serve` will serve '{name}'")
        return False
    best = promoted(Workdir(config.workdir))
    if not best or best["student"] != name:
        raise ServeRefused(f"'{name}' is not the promoted student in {config.workdir}/flywheel/promoted.json")
    update = {"student": None, "mode": "shadow"}  # the promoted student, from the plan's first stage
    deploy(config.model_copy(update={"serve": config.serve.model_copy(update=update)}), echo)
    echo(f"serve: '{name}' ({uri}) deployed, from the first stage of the rollout")
    return True


def _call(config: PipelineConfig, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or, with a body, POST) one of the app's control endpoints with the admin token."""
    s = config.serve
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{s.host}:{s.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    token = os.environ.get(s.admin_token_env) if s.admin_token_env else None
    if s.admin_token_env and not token:
        raise ServeRefused(f"serve.admin_token_env: environment variable {s.admin_token_env} is not set (the admin "
                           "token the control endpoints take)")
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
    gate = stats.get("eval_gate") or {}
    if gate and not gate.get("passed"):
        lines.append(f"eval gate: closed ({gate.get('reason')}): the student may not answer clients")
    plan = stats.get("plan")
    if plan:
        held = f"; held: {plan['held']}" if plan.get("held") else ""
        lines.append(f"rollout plan {' -> '.join(plan['stages'])}: at {plan['stage']}, {plan['stage_requests']}/"
                     f"{plan['min_requests']} student requests; last window {json.dumps(plan['window'])}{held}")
        for d in plan.get("decisions", [])[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(d["time"]))
            lines.append(f"  {when} {d['action']} {d['from']} -> {d['to']}: {d['reason']} {json.dumps(d['figures'])}")
    breaker = stats.get("student_breaker") or {}
    if breaker.get("state", "closed") != "closed" or breaker.get("opened"):
        lines.append(f"student circuit breaker: {breaker['state']} (opened {breaker['opened']} times)")
    for who, lat in sorted(stats["latency"].items()):
        lines.append(f"latency {who}: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms "
                     f"({lat['count']} requests)")
    for category, sl in (stats.get("slices") or {}).items():
        lines.append(f"slice {category}: {sl['requests']} requests, {sl['student_requests']} to the student, fallback "
                     f"rate {sl['fallback_rate']}, p95 {sl['p95_ms']} ms, mean confidence {sl['mean_confidence']}")
    for category, a in stats["shadow_agreement"].items():
        lines.append(f"shadow agreement {category}: {a['agreement']:.3f} over {a['requests']} requests")
    log = stats.get("request_log") or {}
    if log:
        lines.append(f"request log: {log.get('written')} lines written, {log.get('queued')} queued, {log.get('dropped')} "
                     f"dropped, {log.get('write_failures')} write failures")
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
