"""Asking a teacher for many requests, each answer paid for once, and the `teacher/answers` row of each.

`ask_teacher` sends one preflight request from the driver (a bad key, URL, model or request shape stops
there), then fans the rest out to Ray Data workers (`workers.py`) or, in mode "batch", to the provider's
Batch API (`batch.py`), all drawing on the teacher's one ledger. Used by generate, eval's LLM judge and
the flywheel's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pyarrow as pa
import ray

from distill_ray.config.schema import Generate, Teacher
from distill_ray.ray_env import init_ray
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import AnswerCache
from distill_ray.teacher.client import TeacherClient
from distill_ray.teacher.errors import TeacherRejected
from distill_ray.teacher.ledger import LeaseClient, open_ledger, read_spend
from distill_ray.teacher.workers import fan_out

ANSWER_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("category", pa.string()), ("reference", pa.string()),
    ("teacher", pa.string()), ("model", pa.string()), ("sample", pa.int64()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("completion", pa.string()), ("tokens", pa.list_(pa.string())), ("token_logprobs", pa.list_(pa.float64())),
    ("top_logprobs", pa.string()), ("mean_logprob", pa.float64()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("latency_s", pa.float64()),
    ("attempts", pa.int64()), ("finish_reason", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
])


ANSWER_FIELDS = ("completion", "tokens", "token_logprobs", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "reasoning_tokens", "cost_usd", "latency_s", "attempts", "finish_reason")


def answer_row(teacher: Teacher, w: dict[str, Any], answer: dict[str, Any] | None, failed: dict[str, Any] | None,
               not_asked: str) -> dict[str, Any]:
    """The `teacher/answers` row of one work item: its answer, or why it has none (`failed`: the
    last attempt's result, if it was asked; `not_asked`: the error when it was not)."""
    prompt = w["prompt"]
    base = {"id": prompt["id"], "split": prompt["split"], "category": prompt["category"],
            "reference": prompt["reference"], "teacher": teacher.name, "model": teacher.model,
            "sample": w["sample"], "messages": prompt["messages"]}
    if answer is not None:
        logprobs = answer.get("token_logprobs") or []
        return {**base, **{k: answer.get(k) for k in ANSWER_FIELDS},
                "top_logprobs": json.dumps(answer.get("top_logprobs") or []),
                "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None, "error": None, "error_kind": None}
    failed = failed or {}
    return {**base, "error": failed.get("error") or not_asked, "error_kind": failed.get("error_kind") or "not_sent",
            "attempts": failed.get("attempts", 0), "cost_usd": 0.0}


def ask_teacher(teacher: Teacher, work: list[dict[str, Any]], workdir: Workdir, generate: Generate,
                budget_usd: float | None, echo: Callable[[str], None], *, label: str, step: str,
                other_teachers: list[str] = (), cache_parts: tuple[str, ...] | None = None,
                limit: int | None = None, mode: str = "online") -> dict[str, Any]:
    """Ask a teacher for every request of `work` ({key, sample, request: JSON messages}) not yet in
    its cache: one preflight call from the driver, then Ray Data workers (or, in mode "batch", the
    provider's Batch API), all drawing on the teacher's one ledger, every answer durable on arrival.
    Used by generate, and by eval's LLM judge (`cache_parts`, step "eval_judge").

    `budget_usd` caps what every step has spent on every teacher (the ledgers persisted in the
    workdir, `other_teachers` included).

    Returns answers (every cached answer by key), results (this run's outcome by key, errors
    included), nodes (calls per node), cached_before, spent_this_run, spent_step_total, ledger.

    Raises:
        TeacherRejected: the teacher refused the key, URL, model or the request's shape (exit 2).
        TeacherStalled: no progress for generate.stall_timeout_s (exit 1).
    """
    cache = AnswerCache(workdir, teacher.name, cache_parts)
    cached = cache.load()
    pending = [w for w in work if w["key"] not in cached]
    if limit is not None:
        pending = pending[:limit]
    cached_count = sum(1 for w in work if w["key"] in cached)
    echo(f"{label}: {len(work)} answers needed, {cached_count} cached, "
         f"{len(pending)} to ask {teacher.base_url} (model {teacher.model})")
    results: dict[str, dict[str, Any]] = {}
    nodes: Counter[str] = Counter()
    init_ray()
    other_spend = sum(read_spend(workdir, name)["spent_usd"] for name in other_teachers)
    ledger = open_ledger(teacher, workdir, budget_usd, generate.lease_ttl_s, other_spend)
    before = ray.get(ledger.begin_run.remote())
    out: dict[str, Any] = {}
    try:
        held: set[str] = set()
        if pending and mode == "batch":
            from distill_ray.teacher.batch import submitted_keys

            held = submitted_keys(teacher, workdir, cache_parts)  # a batch of a killed run will answer these
        probe = next((w for w in pending if w["key"] not in held), None)
        if probe is not None:
            # One live request from the driver first (in batch mode too, at the online price): a bad key,
            # URL, model or request shape stops here, before any fan-out or batch. Never one a submitted
            # batch holds: the rerun resuming that batch would pay for it twice.
            first = _preflight(teacher, workdir, probe, ledger, step, generate.lease_ttl_s, cache_parts)
            results[first["key"]] = first
            nodes[first["node"]] += 1
            pending = [w for w in pending if w is not probe]
        if pending and mode == "batch":
            from distill_ray.teacher.batch import run_batch

            out["batch"] = run_batch(teacher, pending, workdir, generate, ledger, echo, label=label, step=step,
                                     results=results, cache_parts=cache_parts)
            nodes["batch"] += sum(1 for w in pending if w["key"] in results)
        elif pending:
            fan_out(teacher, pending, workdir, generate, ledger, echo, label, step, cache_parts, results, nodes,
                    before)
    finally:
        state = ray.get(ledger.persist.remote())
    step_row = state["by_step"].get(step, {})
    return {"answers": cache.load(), "results": results, "nodes": nodes, "cached_before": cached_count,
            "spent_this_run": state["spent_usd"] - before["spent_usd"],
            "spent_step_total": step_row.get("spent_usd", 0.0),
            "ledger": {k: state[k] for k in ("spent_usd", "reclaimed", "expired_holders", "expired_slots",
                                             "skipped_answered", "throttled")},
            **out}


# What to change when a teacher refuses the request's shape: the config key for the parameter it names.
SHAPE_ADVICE = {
    "max_tokens": "teachers[].token_limit_param: max_completion_tokens",
    "max_completion_tokens": "teachers[].token_limit_param: max_tokens",
    "temperature": "teachers[].temperature: null (or the value the model accepts)",
    "logprobs": "teachers[].logprobs: false", "top_logprobs": "teachers[].top_logprobs: 0 (or logprobs: false)",
    "reasoning_effort": "teachers[].reasoning_effort", "response_format": "teachers[].response_format",
    "seed": "teachers[].samples: 1",
}


def _preflight(teacher: Teacher, workdir: Workdir, item: dict[str, Any], ledger: Any, step: str, ttl_s: float,
               cache_parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Ask one prompt from the driver, through the ledger; raises TeacherRejected on 401/403/404 and
    when the teacher refuses the request's shape (a 400 naming a parameter)."""
    messages = json.loads(item["request"])
    api_key = os.environ.get(teacher.api_key_env) if teacher.api_key_env else None
    quick = teacher.model_copy(update={"max_retries": min(teacher.max_retries, 2)})
    holder = f"driver:{os.getpid()}:{time.monotonic_ns()}"

    async def ask() -> Any:
        leases = LeaseClient(ledger, 1, holder=holder, step=step, ttl_s=ttl_s)
        try:
            async with aiohttp.ClientSession() as session:
                answer = await TeacherClient(quick, api_key, leases, session).complete(messages, item["sample"],
                                                                                        item["key"])
            if answer.error is None:
                cache = AnswerCache(workdir, teacher.name, cache_parts)
                cache.put({"key": item["key"], "teacher": teacher.name, "model": teacher.model,
                           "sample": item["sample"], "node": "driver", **answer.to_dict()})
                cache.close()
            leases.done(item["key"], answer.error is None)
            return answer
        finally:
            leases.close()

    answer = asyncio.run(ask())
    if answer.error_kind == "connection":
        raise TeacherRejected(f"teacher '{teacher.name}': cannot reach {teacher.base_url} ({answer.error}); is it running?")
    if answer.error_kind == "request_shape":
        param = answer.error.rsplit("(param: ", 1)[-1].rstrip(")") if "(param: " in answer.error else None
        advice = SHAPE_ADVICE.get(param or "", f"the teacher's request options (teachers.{teacher.name})")
        raise TeacherRejected(f"teacher '{teacher.name}' ({teacher.model}) refused the request's shape: {answer.error}. "
                              f"Nothing more was sent; set {advice} and run again.")
    return {"key": item["key"], "error": answer.error, "error_kind": answer.error_kind, "cost_usd": answer.cost_usd,
            "attempts": answer.attempts, "node": "driver"}
