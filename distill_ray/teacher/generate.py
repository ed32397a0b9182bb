"""Step 3a: every prompt (train and holdout) to every teacher, through Ray Data, paid for once.

Each teacher gets one limiter actor (its cluster-wide rpm, tpm, concurrency and the budget) and a
pool of Ray Data actors that send their batches concurrently (async, one aiohttp session each).
Answers are cached durably as they arrive (`cache.py`), so a killed run resumes where it stopped
and a finished run costs nothing to repeat. `teacher/answers` holds one row per
(prompt, teacher, sample); rows whose attempts failed carry `error` and are asked again on the
next run; the manifest then says `partial`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pyarrow as pa
import ray
import ray.data

from distill_ray.config.schema import Generate, PipelineConfig, Task, Teacher
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.ray_env import init_ray, on_this_node
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import AnswerCache, answer_key
from distill_ray.teacher.client import TeacherClient
from distill_ray.teacher.errors import BudgetReached, MissingInput, TeacherRejected
from distill_ray.teacher.limiter import LeaseClient, RateLimiter

STEP = "teacher"
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
                           ("cost_usd", pa.float64()), ("attempts", pa.int64()), ("node", pa.string())])
ANSWER_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("category", pa.string()), ("reference", pa.string()),
    ("teacher", pa.string()), ("model", pa.string()), ("sample", pa.int64()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("completion", pa.string()), ("tokens", pa.list_(pa.string())), ("token_logprobs", pa.list_(pa.float64())),
    ("top_logprobs", pa.string()), ("mean_logprob", pa.float64()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()), ("latency_s", pa.float64()),
    ("attempts", pa.int64()), ("finish_reason", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
])


def teacher_messages(task: Task, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """What the teacher is sent: the task's instructions, its few-shot turns, then the prompt."""
    messages = [{"role": "system", "content": task.instructions}] if task.instructions else []
    for turn in task.few_shot:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    return messages + [{"role": m["role"], "content": m["content"]} for m in prompt]


class TeacherWorker:
    """A Ray Data actor: sends its batches' prompts concurrently and caches each answer on arrival."""

    def __init__(self, teacher_json: dict[str, Any], workdir: str, limiter: Any, lease_batch: int,
                 cache_parts: tuple[str, ...] | None = None):
        self.teacher = Teacher.model_validate(teacher_json)
        env = self.teacher.api_key_env
        api_key = os.environ.get(env) if env else None
        if env and not api_key:
            raise TeacherRejected(f"environment variable {env} (teachers[].api_key_env) is not set on this node")
        self.cache = AnswerCache(Workdir(workdir), self.teacher.name, cache_parts)
        self.cache_lock = threading.Lock()
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.api_key = api_key
        self.leases = LeaseClient(limiter, lease_batch)  # shared by this worker's concurrent batches
        self.active = 0
        self.client: TeacherClient | None = None
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="teacher-io").start()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = asyncio.run_coroutine_threadsafe(self._run(rows), self.loop).result()
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    async def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.client is None:
            # One session per busy spell of the worker, made on its event loop: connections are kept
            # alive across the batches it runs at once and back to back.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
            self.client = TeacherClient(self.teacher, self.api_key, self.leases, session)
        self.active += 1
        client = self.client
        try:
            return list(await asyncio.gather(*(self._one(client, row) for row in rows)))
        finally:
            self.active -= 1
            self.leases.flush()
            if self.active == 0:
                # Idle: give unused leases back to the other workers, and close the connections
                # (an actor's end gives no chance to; the next batch opens new ones).
                self.leases.close()
                self.client = None
                await client.session.close()

    async def _one(self, client: TeacherClient, row: dict[str, Any]) -> dict[str, Any]:
        answer = await client.complete(json.loads(row["request"]), row["sample"], idempotency_key=row["key"])
        if answer.error is None:
            record = {"key": row["key"], "teacher": self.teacher.name, "model": self.teacher.model,
                      "sample": row["sample"], "node": self.node, **answer.to_dict()}
            with self.cache_lock:
                self.cache.put(record)
        return {"key": row["key"], "error": answer.error, "error_kind": answer.error_kind,
                "cost_usd": answer.cost_usd, "attempts": answer.attempts, "node": self.node}


def _load_prompts(workdir: Workdir) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    manifest = read_manifest(workdir, "prompts")
    if not manifest or manifest.get("status") != "complete":
        raise MissingInput(f"no complete prompt set in {workdir.uri_of('prompts')}: run `distill-ray prompts` first")
    rows = []
    for split in ("train", "holdout"):
        for row in workdir.read_table("prompts", split).to_pylist():
            rows.append({**row, "split": split})
    return rows, manifest


def _rejection(exc: BaseException) -> TeacherRejected | None:
    """Find a TeacherRejected raised inside a Ray worker, however Ray wrapped it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, TeacherRejected):
            return seen
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None and "TeacherRejected" in str(seen):
            text = str(seen).split("TeacherRejected:", 1)[-1].strip().splitlines()[0]
            return TeacherRejected(text)
        seen = cause
    return None


def run_generate(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate teacher answers; returns the manifest.

    Raises:
        MissingInput: no prompt set yet.
        TeacherRejected: a teacher refused the key, URL or model (nothing more is sent).
        BudgetReached: budget_usd stopped the step (resumable; exit 1).
    """
    workdir = Workdir(config.workdir)
    prompts, prompts_manifest = _load_prompts(workdir)
    record = StepRecord(STEP, {"prompts": prompts_manifest["fingerprint"]},
                        {"task": config.task.model_dump(mode="json"),
                         "teachers": [t.model_dump(mode="json") for t in config.teachers],
                         "budget_usd": config.budget_usd, "generate": config.generate.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        echo(f"generate: up to date ({manifest['counts']['answered']} answers in {workdir.uri_of(STEP)}); nothing to do")
        return manifest
    for teacher in config.teachers:
        if teacher.api_key_env and not os.environ.get(teacher.api_key_env):
            raise TeacherRejected(f"teachers.{teacher.name}.api_key_env: environment variable "
                                  f"{teacher.api_key_env} is not set")
    workdir.remove(STEP, "manifest.json")
    init_ray()
    t0 = time.perf_counter()
    rows_out: list[dict[str, Any]] = []
    report: dict[str, Any] = {"teachers": {}}
    spent_before_total = 0.0
    budget_left = config.budget_usd
    stopped_by_budget = False
    for teacher in config.teachers:
        result = _generate_one(config, teacher, prompts, workdir, budget_left, echo)
        rows_out.extend(result.pop("rows"))
        report["teachers"][teacher.name] = result
        spent_before_total += result["spent_usd_total"]
        if budget_left is not None:
            budget_left = max(0.0, budget_left - result["spent_usd_total"])
        stopped_by_budget |= result["errors_by_kind"].get("budget", 0) > 0

    workdir.write_table(pa.Table.from_pylist(rows_out, schema=ANSWER_SCHEMA), STEP, "answers")
    errors = Counter(r["error_kind"] for r in rows_out if r["error"])
    report.update({
        "rows": len(rows_out), "answered": len(rows_out) - sum(errors.values()), "errors_by_kind": dict(errors),
        "spent_usd_total": round(spent_before_total, 6), "budget_usd": config.budget_usd,
        "estimate_rest_usd": round(sum(t["estimate_rest_usd"] for t in report["teachers"].values()), 6),
    })
    workdir.write_json(report, STEP, "report.json")
    record.counts = {k: report[k] for k in ("rows", "answered", "errors_by_kind", "spent_usd_total")}
    record.timings = {"total": time.perf_counter() - t0}
    status = "partial" if errors else "complete"
    manifest = write_manifest(workdir, record, status)
    echo(summary(report, workdir.uri_of(STEP), status))
    if stopped_by_budget:
        raise BudgetReached(f"generate stopped at budget_usd={config.budget_usd}: spent ${spent_before_total:.4f}; "
                            f"{errors['budget']} answers not asked (about ${report['estimate_rest_usd']:.4f} more). "
                            "Raise budget_usd and run again to resume; nothing paid for is asked again.")
    return manifest


def _generate_one(config: PipelineConfig, teacher: Teacher, prompts: list[dict[str, Any]], workdir: Workdir,
                  budget_left: float | None, echo: Callable[[str], None]) -> dict[str, Any]:
    work = []
    for prompt in prompts:
        messages = teacher_messages(config.task, prompt["messages"])
        for sample in range(teacher.samples):
            key = answer_key(teacher, messages, sample)
            work.append({"key": key, "sample": sample, "request": json.dumps(messages, ensure_ascii=False),
                         "prompt": prompt})
    asked = ask_teacher(teacher, work, workdir, config.generate, budget_left, echo, label=f"generate[{teacher.name}]",
                        limit=config.generate.limit)
    answers, results, nodes = asked["answers"], asked["results"], asked["nodes"]
    cached_count, spent_before = asked["cached_before"], asked["spent_before"]
    rows, errors = [], Counter()
    for w in work:
        prompt, answer = w["prompt"], answers.get(w["key"])
        base = {"id": prompt["id"], "split": prompt["split"], "category": prompt["category"],
                "reference": prompt["reference"], "teacher": teacher.name, "model": teacher.model,
                "sample": w["sample"], "messages": prompt["messages"]}
        if answer is not None:
            logprobs = answer.get("token_logprobs") or []
            rows.append({**base, **{k: answer.get(k) for k in ("completion", "tokens", "token_logprobs", "prompt_tokens",
                                                                  "completion_tokens", "cost_usd", "latency_s",
                                                                  "attempts", "finish_reason")},
                         "top_logprobs": json.dumps(answer.get("top_logprobs") or []),
                         "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None,
                         "error": None, "error_kind": None})
        else:
            failed = results.get(w["key"])
            kind = failed["error_kind"] if failed else "not_sent"
            error = failed["error"] if failed else "not asked in this run (generate.limit)"
            errors[kind] += 1
            rows.append({**base, "error": error, "error_kind": kind, "attempts": failed["attempts"] if failed else 0,
                         "cost_usd": 0.0})
    spent_total = sum(a.get("cost_usd") or 0.0 for a in answers.values())
    mean_cost = spent_total / len(answers) if answers else 0.0
    return {
        "rows": rows, "answers_needed": len(work), "cached_before": cached_count,
        "asked": len(results), "answered_now": sum(1 for r in results.values() if not r["error"]),
        "errors_by_kind": dict(errors), "spent_usd_this_run": round(spent_total - spent_before, 6),
        "spent_usd_total": round(spent_total, 6), "estimate_rest_usd": round(mean_cost * sum(errors.values()), 6),
        "calls_by_node": dict(nodes),
    }


def ask_teacher(teacher: Teacher, work: list[dict[str, Any]], workdir: Workdir, generate: Generate,
                budget_left: float | None, echo: Callable[[str], None], *, label: str,
                cache_parts: tuple[str, ...] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Ask a teacher for every request of `work` ({key, sample, request: JSON messages}) not yet in
    its cache: one preflight call from the driver, then Ray Data workers under one rate limiter,
    every answer durable on arrival. Used by generate, and by eval's LLM judge (`cache_parts`).

    Returns answers (every cached answer by key), results (this run's outcome by key, errors
    included), nodes (calls per node), cached_before, spent_before.
    """
    cache = AnswerCache(workdir, teacher.name, cache_parts)
    cached = cache.load()
    pending = [w for w in work if w["key"] not in cached]
    if limit is not None:
        pending = pending[:limit]
    spent_before = sum(r.get("cost_usd") or 0.0 for r in cached.values())
    cached_count = sum(1 for w in work if w["key"] in cached)
    echo(f"{label}: {len(work)} answers needed, {cached_count} cached, "
         f"{len(pending)} to ask {teacher.base_url} (model {teacher.model})")
    results: dict[str, dict[str, Any]] = {}
    nodes: Counter[str] = Counter()
    if pending:
        # One request from the driver first: a bad key, URL or model stops here, before any fan-out.
        first = _preflight(teacher, workdir, pending[0], budget_left - spent_before if budget_left is not None else None,
                           cache_parts)
        results[first["key"]] = first
        nodes[first["node"]] += 1
        pending = pending[1:]
    if pending:
        init_ray()
        limiter = RateLimiter.options(scheduling_strategy=on_this_node()).remote(
            teacher.requests_per_minute, teacher.tokens_per_minute, teacher.max_concurrency,
            budget_left - spent_before if budget_left is not None else None)
        ds = ray.data.from_items([{"key": w["key"], "sample": w["sample"], "request": w["request"]} for w in pending])
        mapped = ds.map_batches(
            TeacherWorker, batch_size=generate.batch_size, batch_format="pyarrow",
            # Several batches per worker at once: their __call__ threads hand the rows to the worker's
            # event loop (true multi-threading, or Ray Data would run one UDF call at a time per actor).
            compute=ray.data.ActorPoolStrategy(size=generate.num_workers,
                                               max_concurrent_calls_per_actor=generate.batches_per_worker,
                                               enable_true_multi_threading=True),
            fn_constructor_kwargs={"teacher_json": teacher.model_dump(mode="json"), "workdir": workdir.uri,
                                   "limiter": limiter, "lease_batch": _lease_batch(teacher, generate),
                                   "cache_parts": cache_parts},
            num_cpus=0.5, scheduling_strategy=generate.scheduling_strategy,
        )
        progress = _Progress(label, limiter, len(pending), spent_before, results, generate.progress_every_s, echo)
        try:
            for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.to_pylist():
                    results[r["key"]] = r
                    nodes[r["node"]] += 1
        except Exception as exc:
            rejected = _rejection(exc)
            if rejected is not None:
                raise rejected from None
            raise
        finally:
            progress.stop()
            ray.kill(limiter)
    return {"answers": cache.load(), "results": results, "nodes": nodes, "cached_before": cached_count,
            "spent_before": spent_before}


class _Progress:
    """A line every `every_s` seconds from the limiter's counters (answers arrive long before their
    batch ends): answered, rate, in flight, row errors so far, spend, 429s."""

    def __init__(self, name: str, limiter: Any, total: int, spent_before: float, results: dict[str, Any],
                 every_s: float, echo: Callable[[str], None]):
        self.name, self.limiter, self.total, self.spent_before = name, limiter, total, spent_before
        self.results, self.every_s, self.echo = results, every_s, echo
        self.start = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="generate-progress")
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                state = ray.get(self.limiter.state.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort; the step reports errors itself
                continue
            elapsed = time.monotonic() - self.start
            errors = sum(1 for r in list(self.results.values()) if r["error"])
            self.echo(f"{self.name}: {state['answered']}/{self.total} answered, "
                      f"{state['answered'] / elapsed:.1f}/s, {state['in_flight']} in flight, {errors} row errors, "
                      f"${self.spent_before + state['spent_usd']:.4f} spent, {state['throttled']} 429s")

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _lease_batch(teacher: Teacher, generate: Generate) -> int:
    """Requests leased per actor call: small enough that workers cannot hoard the concurrency."""
    return max(1, min(32, teacher.max_concurrency // generate.num_workers))


def _preflight(teacher: Teacher, workdir: Workdir, item: dict[str, Any], budget: float | None,
               cache_parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Ask one prompt from the driver; raises TeacherRejected on 401/403/404."""
    from distill_ray.teacher.client import cost_usd, estimate_tokens

    messages = json.loads(item["request"])
    if budget is not None and cost_usd(teacher, estimate_tokens(messages), teacher.max_tokens) > budget:
        return {"key": item["key"], "error": "budget_usd reached: not sent", "error_kind": "budget", "cost_usd": 0.0,
                "attempts": 0, "node": "driver"}
    api_key = os.environ.get(teacher.api_key_env) if teacher.api_key_env else None

    quick = teacher.model_copy(update={"max_retries": min(teacher.max_retries, 2)})

    async def ask() -> Any:
        async with aiohttp.ClientSession() as session:
            return await TeacherClient(quick, api_key, None, session).complete(messages, item["sample"], item["key"])

    answer = asyncio.run(ask())
    if answer.error_kind == "connection":
        raise TeacherRejected(f"teacher '{teacher.name}': cannot reach {teacher.base_url} ({answer.error}); is it running?")
    if answer.error is None:
        cache = AnswerCache(workdir, teacher.name, cache_parts)
        cache.put({"key": item["key"], "teacher": teacher.name, "model": teacher.model, "sample": item["sample"],
                   "node": "driver", **answer.to_dict()})
        cache.close()
    return {"key": item["key"], "error": answer.error, "error_kind": answer.error_kind, "cost_usd": answer.cost_usd,
            "attempts": answer.attempts, "node": "driver"}


def summary(report: dict[str, Any], where: str, status: str) -> str:
    lines = [f"generate: {report['answered']}/{report['rows']} answers in {where} ({status}); "
             f"spent ${report['spent_usd_total']:.4f} in all"]
    for name, t in report["teachers"].items():
        lines.append(f"  {name}: asked {t['asked']}, answered now {t['answered_now']}, cached before "
                     f"{t['cached_before']}, this run ${t['spent_usd_this_run']:.4f}, errors {t['errors_by_kind'] or 0}"
                     + (f", calls by node {t['calls_by_node']}" if t["calls_by_node"] else ""))
    if report["errors_by_kind"]:
        lines.append(f"  rows with errors are asked again on the next run: {report['errors_by_kind']}")
    return "\n".join(lines)
