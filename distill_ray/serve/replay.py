"""The `replay` step of `distill-ray run`: the student served behind the safety net, with traffic.

Starts the serve app on the local (or connected) Ray, sends the held-out prompts through it as a
client of the teacher would (the teacher's full prompt: instructions and few-shot turns; the
router strips the few-shot turns for the student), with the official `openai` client, a user id
per prompt and its category — first in shadow mode, then, after `distill-ray rollout`'s switch to
canary (`serve.canary_percent`), again — then removes the app. `serve/replay.json` holds per phase
who answered, the fallbacks by reason, latency and the quality of the served answers (against the
reference where the log had one, else the teacher's holdout answer); the request logs feed
`distill-ray drift`. Every replayed request says where it comes from (`x-distill-origin:
replay:holdout`, logged as the line's `origin`), so drift compares it with the prompts it was drawn
from, not with client traffic: the holdout keeps a minimum per category, so its mix is not the
production mix and would otherwise read as a moved one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig
from distill_ray.eval.scoring import percentile
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.metrics import holdout_target, metric
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

STEP = "serve"
ORIGIN = "replay:holdout"  # the `x-distill-origin` of every replayed request: its traffic origin in the logs


def run_replay(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from ray import serve

    from distill_ray.serve.control import APP_NAME
    from distill_ray.serve.step import _reset_control, deploy, fetch_stats, rollout

    workdir = Workdir(config.workdir)
    evaluated = read_manifest(workdir, "eval")
    if not evaluated:
        raise MissingInput(f"no eval in {workdir.uri_of('eval')}: run `distill-ray eval` first")
    record = StepRecord(f"{STEP}/replay", {"eval": evaluated["fingerprint"]},
                        {"serve": config.serve.model_dump(mode="json"), "teachers": [t.model_dump(mode="json")
                                                                                     for t in config.teachers]})
    if manifest := up_to_date(workdir, record):
        echo(f"replay: up to date ({workdir.uri_of(STEP, 'replay.json')}); nothing to do")
        return manifest
    for env in (config.serve.auth_token_env, config.serve.admin_token_env):
        if env and not os.environ.get(env):
            os.environ[env] = secrets.token_urlsafe(24)  # this run's own token, known to this process only
            echo(f"replay: {env} is not set; using a random token for this run")
    prompts = replay_sample(workdir.read_table("prompts", "holdout").to_pylist(), config.serve.replay_requests)
    references = _targets(workdir, config)
    shadow_config = config.model_copy(update={"serve": config.serve.model_copy(update={"mode": "shadow"})})
    t0 = time.perf_counter()
    deployed = deploy(shadow_config, echo)
    phases = {}
    try:
        phases["shadow"] = _replay(config, deployed["url"], prompts, references, "shadow", echo)
        rollout(config, "canary", config.serve.canary_percent, None, echo)
        phases["canary"] = _replay(config, deployed["url"], prompts, references, "canary", echo)
        time.sleep(1.5)  # the shadow comparisons still running land in the logs
        stats = fetch_stats(config)
    finally:
        serve.delete(APP_NAME)
        _reset_control()
    report = {"student": deployed["student"], "url": deployed["url"], "phases": phases, "stats": stats,
              "logs": workdir.uri_of(STEP, "logs")}
    workdir.write_json(report, STEP, "replay.json")
    record.counts = {phase: p["requests"] for phase, p in phases.items()}
    record.timings = {"total": time.perf_counter() - t0}
    manifest = write_manifest(workdir, record)
    agreement = stats.get("shadow_agreement") or {}
    if agreement:
        n = sum(a["requests"] for a in agreement.values())
        mean = sum(a["agreement"] * a["requests"] for a in agreement.values()) / n
        echo(f"replay: shadow agreement {mean:.3f} over {n} requests; per slice: "
             + ", ".join(f"{c} {a['agreement']:.2f}" for c, a in agreement.items()))
    return manifest


def replay_sample(prompts: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """`n` of the held-out prompts, the same ones every run (by a hash of their id), so the sample
    keeps the holdout's category mix in expectation; all of them when n is None."""
    if n is None or n >= len(prompts):
        return prompts
    return sorted(prompts, key=lambda p: hashlib.sha256(p["id"].encode()).hexdigest())[:n]


def _targets(workdir: Workdir, config: PipelineConfig) -> dict[str, str]:
    """Per holdout prompt: its target by `holdout_target`'s rule, any reference teacher answer allowed."""
    teacher = config.reference_teacher.name
    out = {}
    for r in workdir.read_table("teacher", "answers").to_pylist():
        if r["split"] == "holdout" and r["teacher"] == teacher and r["sample"] == 0:
            target = holdout_target({"reference": r["reference"], "teacher": r["completion"]}, trusted_only=False)
            if target is not None:
                out[r["id"]] = target
    return out


def _replay(config: PipelineConfig, url: str, prompts: list[dict[str, Any]], targets: dict[str, str], phase: str,
            echo: Callable[[str], None]) -> dict[str, Any]:
    import openai

    # imported here: it pulls in Ray Data, and drift imports this module for the replay sample
    from distill_ray.chat import teacher_messages

    # The admin token: the app takes the x-distill-origin tag (this traffic is the holdout, not clients')
    # only from a request that carries it.
    env = config.serve.admin_token_env or config.serve.auth_token_env
    token = os.environ.get(env) if env else None
    score = metric(config.task.string_metric, config.task.metric_pattern)
    max_tokens = config.fallback_teacher.max_tokens  # what clients of the served teacher send

    async def main() -> list[dict[str, Any]]:
        client = openai.AsyncOpenAI(base_url=url, api_key=token or "none", max_retries=0, timeout=120)
        gate = asyncio.Semaphore(config.serve.replay_concurrency)

        async def one(prompt: dict[str, Any]) -> dict[str, Any]:
            user = "user-" + hashlib.sha256(prompt["id"].encode()).hexdigest()[:12]
            async with gate:
                t = time.perf_counter()
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=config.fallback_teacher.model, messages=teacher_messages(config.task, prompt["messages"]),
                        max_tokens=max_tokens, temperature=0.0, user=user,
                        extra_headers={"x-category": prompt["category"], "x-distill-origin": ORIGIN})
                except openai.APIError as err:
                    return {"id": prompt["id"], "error": str(err)[:200], "latency_ms": (time.perf_counter() - t) * 1000}
                chat = raw.parse()
                return {"id": prompt["id"], "category": prompt["category"], "served_by": raw.headers.get("x-served-by"),
                        "reason": raw.headers.get("x-fallback-reason"), "answer": chat.choices[0].message.content,
                        "latency_ms": (time.perf_counter() - t) * 1000}

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    t0 = time.perf_counter()
    rows = asyncio.run(main())
    wall = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    scored = [score(r["answer"], targets[r["id"]]) for r in ok if r["id"] in targets]
    latencies = sorted(r["latency_ms"] for r in ok)
    out = {"requests": len(rows), "errors": len(rows) - len(ok), "served_by": dict(Counter(r["served_by"] for r in ok)),
           "fallbacks": dict(Counter(r["reason"] for r in ok if r["reason"])),
           "served_quality": round(sum(scored) / len(scored), 4) if scored else None,
           "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
           "p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
           "requests_per_s": round(len(rows) / wall, 2)}
    echo(f"replay[{phase}]: {out['requests']} held-out requests, {out['errors']} errors; served by "
         + ", ".join(f"{k} {v}" for k, v in sorted(out["served_by"].items()))
         + (f"; fallbacks {out['fallbacks']}" if out["fallbacks"] else "")
         + f"; served quality {out['served_quality']}; p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms")
    return out
