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


def _eval_results(workdir: Workdir) -> dict[str, Any]:
    if not workdir.exists("eval", "metrics.json"):
        return {}
    return json.loads(workdir.read_bytes("eval", "metrics.json")).get("students", {})


def promoted(workdir: Workdir) -> dict[str, Any] | None:
    """The student the flywheel (`distill-ray redistill`) found better than the served one, if any."""
    if not workdir.exists("flywheel", "promoted.json"):
        return None
    return json.loads(workdir.read_bytes("flywheel", "promoted.json"))


def pick_student(config: PipelineConfig, workdir: Workdir, mode: str) -> tuple[str, str, dict[str, Any] | None]:
    """(name, checkpoint URI, its eval result) of the student to serve: serve.student, else the
    flywheel's promoted student, else the smallest that passed eval (in shadow mode, where the
    student never answers a client, the best by relative quality even if none passed)."""
    results = _eval_results(workdir)
    if config.serve.student:
        name = config.serve.student
    elif (best := promoted(workdir)) is not None:
        return best["student"], best["checkpoint"], best.get("eval")
    else:
        if not results:
            raise ServeRefused(f"no eval results in {workdir.uri_of('eval')}: run `distill-ray eval` first, or name "
                               "serve.student")
        passed = [r for r in results.values() if r["passed"]]
        if passed:
            name = min(passed, key=lambda r: (r["parameters"], -r["quality"]["overall"]["relative_quality"]))["student"]
        else:
            name = max(results.values(), key=lambda r: r["quality"]["overall"]["relative_quality"])["student"]
    manifest = read_manifest(workdir, f"students/{name}")
    if not manifest or manifest.get("status") != "complete":
        raise ServeRefused(f"student '{name}' has no finished training in {workdir.uri_of('students', name)}")
    return name, workdir.uri_of("students", name, "best"), results.get(name)


def student_gate(config: PipelineConfig, workdir: Workdir, name: str) -> tuple[bool, str]:
    """Whether the student may answer clients (canary, full): it passed eval (or the flywheel's
    round eval that promoted it), or serve.skip_eval_gate says so. The serve app judges this itself."""
    if config.serve.skip_eval_gate:
        return True, "serve.skip_eval_gate is set"
    best = promoted(workdir)
    if best is not None and best["student"] == name:
        return bool(best.get("passed")), f"the flywheel's eval (round {best.get('round')}) " + (
            "passed" if best.get("passed") else "did not pass")
    result = _eval_results(workdir).get(name)
    if result is None:
        return False, f"no eval result for '{name}' in {workdir.uri_of('eval', 'metrics.json')} (run `distill-ray eval`)"
    if not result["passed"]:
        return False, f"'{name}' did not pass eval (serve.skip_eval_gate overrides)"
    return True, "passed eval"


def known_categories(workdir: Workdir) -> list[str]:
    """The prompt set's slices (the metrics' category labels), from prompts/report.json: the categories
    counted in its `category_counts` (`source`, `train`, `holdout`; a flywheel round's report has the
    last two), not that section's own keys."""
    if not workdir.exists("prompts", "report.json"):
        return []
    counts = json.loads(workdir.read_bytes("prompts", "report.json")).get("category_counts") or {}
    return sorted({c for part in ("source", "train", "holdout") for c in counts.get(part) or {}})


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


def _token_sha256(env: str | None, key: str) -> str | None:
    """The SHA-256 of the token in `env` (the token never leaves this process), or of `<env>_SHA256`
    where only the hash is mounted (a RayService)."""
    if env is None:
        return None
    if os.environ.get(env):
        return hashlib.sha256(os.environ[env].encode()).hexdigest()
    digest = os.environ.get(f"{env}_SHA256", "").strip().lower()
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    raise ServeRefused(f"serve.{key}: environment variable {env} (or {env}_SHA256, the token's SHA-256) is not set; set "
                       f"it, or set serve.{key}: null with serve.allow_open_endpoint: true for an open endpoint")


def app_args(config: PipelineConfig, student: str, uri: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config.model_copy(update={"serve": config.serve.model_copy(
        update={"min_confidence": resolve_min_confidence(config, result)})})
    s = config.serve
    if s.student_adapter:
        _check_adapter(config, student, uri)
    if s.mode != "shadow":
        passed, why = student_gate(config, Workdir(config.workdir), student)
        if not passed:
            raise ServeRefused(f"student '{student}' may not answer clients in {s.mode} mode: {why}; serve in shadow "
                               "mode (or with serve.rollout_plan), or set serve.skip_eval_gate: true")
    return {"config": config.model_dump(mode="json", by_alias=True), "student_uri": uri, "student_name": student,
            "token_sha256": _token_sha256(s.auth_token_env, "auth_token_env"),
            "admin_sha256": _token_sha256(s.admin_token_env, "admin_token_env"),
            "generation": time.time(),  # a redeploy's rollout control replaces an earlier one's
            "rollout": {"mode": s.mode, "canary_percent": s.canary_percent, "min_confidence": s.min_confidence,
                        "latency_budget_ms": s.latency_budget_ms}}


def _check_adapter(config: PipelineConfig, student: str, uri: str) -> None:
    """serve.student_adapter: the student's adapter and base are where vLLM reads them (the flywheel's
    promoted student, not in `students:`, counts as a LoRA student when its adapter is there)."""
    from distill_ray.serve.student import adapter_paths
    from distill_ray.storage import is_s3

    if is_s3(uri):
        raise ServeRefused("serve.student_adapter: vLLM loads the adapter from a local (or shared) folder, and "
                           f"{uri} is on S3; set serve.student_adapter: false to serve the merged checkpoint")
    entry = next((x for x in config.students if x.name == student), None)
    if entry is not None and entry.lora is None:
        raise ServeRefused(f"serve.student_adapter: student '{student}' has no `lora:` (only LoRA students have an "
                           "adapter); set serve.student_adapter: false to serve its checkpoint")
    base, adapter = adapter_paths(uri)
    for path in (os.path.join(adapter, "adapter_config.json"), os.path.join(base, "config.json")):
        if not os.path.exists(path):
            raise ServeRefused(f"serve.student_adapter: {path} does not exist (a LoRA student's training writes its "
                               "base to students/<name>/init and its adapter to students/<name>/best/adapter); run "
                               "`distill-ray train` again, or set serve.student_adapter: false")


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
    from pydantic import ValidationError

    from distill_ray.config.schema import Rollout

    current = fetch_stats(config)["rollout"]
    if plan is not None:
        answer = _call(config, "/v1/distill/rollout", {"plan": plan})
        status = answer.get("plan") or {}
        echo(f"rollout: plan {plan}d at stage {status.get('stage')} (mode {answer['rollout']['mode']}, canary "
             f"{answer['rollout']['canary_percent']:g}%)")
        return answer["rollout"]
    changes = {k: v for k, v in (("mode", mode), ("canary_percent", percent), ("min_confidence", min_confidence))
               if v is not None}
    try:
        wanted = Rollout.model_validate({**current, **changes}).model_dump()  # validated before anything changes
    except ValidationError as exc:
        raise ServeRefused("rollout: " + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                                   for e in exc.errors())) from None
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


def record_rollout(workdir: Workdir, rollout: dict[str, Any], by: str, student: str,
                   decision: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> None:
    """`serve/rollout.json`: the live rollout and its history (who changed what, when; the plan's
    decisions with their figures; `state`: what a re-made control actor resumes from)."""
    history = []
    if workdir.exists("serve", "rollout.json"):
        history = json.loads(workdir.read_bytes("serve", "rollout.json")).get("history", [])
    entry = {**rollout, "student": student, "by": by, "time": time.time(), **(state or {})}
    if decision is not None:
        entry["decision"] = decision
    workdir.write_json({"current": entry, "history": [*history, entry][-200:]}, "serve", "rollout.json")
