"""A round's teacher answers: reused where already paid for, asked for the rest, on the pipeline's one ledger.

Answers are looked for, per prompt, first in the teacher cache of the pipeline's workdir
(`<workdir>/teacher/cache/<teacher>/`: every answer generate, or an earlier round, paid for), then in
the request logs: a teacher answer the serve app paid for (shadow mode, users routed to the teacher,
fallbacks) is put into that cache when it is the answer generate would have paid for (`reuse_verdict`):

- the same teacher: the logged `name` and `model` are the config's;
- the same request messages: `messages_sha256` is `messages_digest(teacher_messages(task, prompt))`, i.e.
  the client sent the task's instructions and few-shot turns, as generate does;
- the same sampling: the `temperature` sent equals the teacher's (both null: none sent), and no `stop` or
  `top_p` was sent (they change the answer; a `seed` does not change what is drawn);
- a whole answer within generate's limit: `finish_reason` "stop" and `completion_tokens` at most the
  teacher's `max_tokens`. An answer that ended by itself within both limits is what a request with
  either limit gets (greedy), or a draw from the same distribution (temperature > 0); an answer cut at
  the client's smaller limit ("length") is not.

Only the rest is asked for, through `ask_teacher` on the pipeline's workdir: its ledger is the one
generate, eval's judge and the live serve app draw on, so the requests-per-minute and concurrency limits
hold across the round and live traffic, and `budget_usd` counts every step's spend (this one's is
`redistill` in the ledger's spend by step, `<workdir>/teacher/ledger/<teacher>.json`).

A reused answer keeps its token logprobs: the router asks the teacher for them as generate does
(`teachers[].logprobs`, `top_logprobs`) and logs `tokens`, `token_logprobs` and `top_logprobs` in its
`teacher` record, so filters such as `min_mean_logprob` judge it like any other. Lines logged before
the router did (or with `logprobs: false`) reuse the text only: their rows have a null `mean_logprob`,
which a `min_mean_logprob` filter drops ("the teacher returned no logprobs"; the summary counts them).
Its cost was counted in serve's spend when it was paid; its row keeps that cost (eval prices the
teacher with it).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from distill_ray.chat import teacher_messages
from distill_ray.config.schema import PipelineConfig, Teacher
from distill_ray.errors import StepFailed
from distill_ray.flywheel.served import conversation_text, served_prompt
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.storage import Workdir
from distill_ray.teacher.ask import ANSWER_SCHEMA, answer_row, ask_teacher
from distill_ray.teacher.cache import AnswerCache, answer_key, messages_digest
from distill_ray.teacher.errors import BudgetReached, MissingInput

STEP = "teacher"  # the round's teacher/ artifacts, as generate writes them, so filter, train and eval read them
LEDGER_STEP = "redistill"  # the spend's name in the ledger
FROM_LOGS = "serve-log"  # the cache record's `node` for an answer taken from a request log


def reuse_verdict(logged: dict[str, Any], teacher: Teacher, digest: str) -> str | None:
    """None when the logged teacher call (a log line's `teacher`) is the answer generate would pay for;
    otherwise why not: error, other_teacher, other_messages, other_sampling, not_finished, over_max_tokens."""
    if logged.get("error") or not isinstance(logged.get("answer"), str):
        return "error"
    if logged.get("name") != teacher.name or logged.get("model") != teacher.model:
        return "other_teacher"
    if logged.get("messages_sha256") != digest:
        return "other_messages"
    params = logged.get("params") or {}
    if (logged.get("temperature") != teacher.temperature or "stop" in params or "top_p" in params
            or params.get("reasoning_effort", teacher.reasoning_effort) != teacher.reasoning_effort):
        return "other_sampling"
    if logged.get("finish_reason") != "stop":
        return "not_finished"
    used = logged.get("completion_tokens")
    if used is None:
        used = logged.get("max_tokens")
    if used is None or used > teacher.max_tokens:
        return "over_max_tokens"
    return None


def logged_calls(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every logged teacher call with an answer, by the prompt's `conversation_text`, oldest first.
    Any line counts (a replayed or failed request's teacher answer was paid for all the same)."""
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        called = line.get("teacher")
        turns = served_prompt(line) if isinstance(called, dict) else None
        if turns is not None:
            by_prompt[conversation_text(turns)].append({**called, "request_id": line.get("request_id"),
                                                        "latency_ms": line.get("teacher_latency_ms")})
    return by_prompt


def _cache_record(key: str, teacher: Teacher, called: dict[str, Any]) -> dict[str, Any]:
    latency = called.get("latency_ms")
    return {"key": key, "teacher": teacher.name, "model": teacher.model, "sample": 0, "node": FROM_LOGS,
            "request_id": called.get("request_id"), "completion": called["answer"],
            # The logprobs the router asked for as generate does (empty in lines logged before it did).
            "tokens": called.get("tokens") or [], "token_logprobs": called.get("token_logprobs") or [],
            "top_logprobs": called.get("top_logprobs") or [], "prompt_tokens": called.get("prompt_tokens") or 0,
            "completion_tokens": called.get("completion_tokens") or 0, "cached_tokens": called.get("cached_tokens") or 0,
            "reasoning_tokens": 0, "finish_reason": "stop", "latency_s": latency / 1000 if latency else None,
            "attempts": 1, "cost_usd": called.get("cost_usd") or 0.0, "error": None, "error_kind": None}


def seed_from_logs(teacher: Teacher, work: list[dict[str, Any]], cache: AnswerCache, cached: dict[str, Any],
                   calls: dict[str, list[dict[str, Any]]]) -> tuple[int, Counter[str]]:
    """Put each usable logged answer of a `work` item the cache lacks into the cache (durable on return).

    Returns:
        (answers put in the cache, prompts whose logged answers were all unusable by the first reason).
    """
    seeded, refused = 0, Counter()
    try:
        for item in work:
            if item["key"] in cached or item["sample"] != 0:
                continue
            reasons = []
            for called in calls.get(item["text"], []):
                reason = reuse_verdict(called, teacher, item["digest"])
                if reason is None:
                    record = _cache_record(item["key"], teacher, called)
                    cache.put(record)
                    cached[item["key"]] = record
                    seeded += 1
                    break
                reasons.append(reason)
            else:
                if reasons:
                    refused[reasons[0]] += 1
    finally:
        cache.close()
    return seeded, refused


def _round_prompts(workdir: Workdir) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    manifest = read_manifest(workdir, "prompts")
    if not manifest or manifest.get("status") != "complete":
        raise MissingInput(f"no complete prompt set in {workdir.uri_of('prompts')}")
    rows = [{**row, "split": split} for split in ("train", "holdout")
            for row in workdir.read_table("prompts", split).to_pylist()]
    return rows, manifest


def round_answers(config: PipelineConfig, pipeline: Workdir, lines: list[dict[str, Any]], budget_usd: float | None,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The round's `teacher/` (answers, report, manifest) for its prompt set; returns the manifest,
    whose `counts` say per teacher how many answers came from the cache, from the logs, and were asked.

    Args:
        config: the round's config (its workdir holds the round's prompts).
        pipeline: the pipeline's workdir: its teacher cache and ledger.
        lines: every request log line (for the answers the serve app paid for).
        budget_usd: the pipeline's `budget_usd` (its ledger counts what every step spent).

    Raises:
        BudgetReached: budget_usd stopped the asking (resumable; exit 1).
        StepFailed: some prompts have no answer after the retries (run again to ask for them).
    """
    workdir = Workdir(config.workdir)
    prompts, prompts_manifest = _round_prompts(workdir)
    record = StepRecord(STEP, {"prompts": prompts_manifest["fingerprint"]},
                        {"task": config.task.model_dump(mode="json"),
                         "teachers": [t.model_dump(mode="json") for t in config.teachers],
                         "budget_usd": budget_usd, "generate": config.generate.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        return manifest
    workdir.remove(STEP, "manifest.json")
    t0 = time.perf_counter()
    calls = logged_calls(lines)
    rows, report = [], {"teachers": {}}
    for teacher in config.teachers:
        work = []
        for prompt in prompts:
            messages = teacher_messages(config.task, prompt["messages"])
            for sample in range(teacher.samples):
                work.append({"key": answer_key(teacher, messages, sample), "sample": sample, "prompt": prompt,
                             "request": json.dumps(messages, ensure_ascii=False), "digest": messages_digest(messages),
                             "text": conversation_text(prompt["messages"])})
        cache = AnswerCache(pipeline, teacher.name)
        cached = cache.load()
        seeded, refused = seed_from_logs(teacher, work, cache, cached, calls)
        from_logs = sum(1 for w in work if cached.get(w["key"], {}).get("node") == FROM_LOGS)
        from_cache = sum(1 for w in work if w["key"] in cached) - from_logs
        asked = ask_teacher(teacher, work, pipeline, config.generate, budget_usd, echo,
                            label=f"redistill[{teacher.name}]", step=LEDGER_STEP, limit=config.generate.limit,
                            other_teachers=[t.name for t in config.teachers if t.name != teacher.name],
                            mode=config.generate.mode)
        errors = Counter()
        for w in work:
            row = answer_row(teacher, w, asked["answers"].get(w["key"]), asked["results"].get(w["key"]),
                             "not asked in this run")
            if row["error"] is not None:
                errors[row["error_kind"]] += 1
            rows.append(row)
        report["teachers"][teacher.name] = {
            "answers_needed": len(work), "from_cache": from_cache, "from_logs": from_logs,
            "from_logs_now": seeded, "logs_not_reusable": dict(refused), "asked": len(asked["results"]),
            "answered_now": sum(1 for r in asked["results"].values() if not r["error"]),
            "spent_usd_this_run": round(asked["spent_this_run"], 6), "errors_by_kind": dict(errors)}
    workdir.write_table(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), STEP, "answers")
    errors = Counter(r["error_kind"] for r in rows if r["error"])
    report.update({"rows": len(rows), "answered": len(rows) - sum(errors.values()), "errors_by_kind": dict(errors),
                   "cache": pipeline.uri_of("teacher", "cache"), "ledger": pipeline.uri_of("teacher", "ledger")})
    workdir.write_json(report, STEP, "report.json")
    record.counts = {"rows": len(rows), "answered": report["answered"], "errors_by_kind": dict(errors),
                     "teachers": report["teachers"]}
    record.timings = {"total": time.perf_counter() - t0}
    manifest = write_manifest(workdir, record, "partial" if errors else "complete")
    if errors.get("budget"):
        raise BudgetReached(f"redistill stopped at budget_usd={budget_usd}: {errors['budget']} answers not "
                            "asked. Raise budget_usd and run again to resume; nothing paid for is asked again.")
    if errors:
        raise StepFailed(f"redistill: {sum(errors.values())} prompts have no teacher answer ({dict(errors)}); run "
                         "again to ask for them (the answers received are kept)")
    return manifest
