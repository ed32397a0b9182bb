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
from distill_ray.ray_env import init_ray
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import AnswerCache, answer_key
from distill_ray.teacher.client import TeacherClient
from distill_ray.teacher.errors import BudgetReached, MissingInput, TeacherRejected, TeacherStalled
from distill_ray.teacher.ledger import LeaseClient, open_ledger, read_spend, spend_by_step

STEP = "teacher"
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
                           ("cost_usd", pa.float64()), ("attempts", pa.int64()), ("node", pa.string())])
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


def teacher_messages(task: Task, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """What the teacher is sent: the task's instructions, its few-shot turns, then the prompt."""
    messages = [{"role": "system", "content": task.instructions}] if task.instructions else []
    for turn in task.few_shot:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    return messages + [{"role": m["role"], "content": m["content"]} for m in prompt]


class TeacherWorker:
    """A Ray Data actor: sends its batches' prompts concurrently and caches each answer on arrival.

    Before sending, it claims its batch's answer keys from the ledger: a key answered already in this
    run (a batch Ray Data runs again after a node loss) is not sent again.
    """

    def __init__(self, teacher_json: dict[str, Any], workdir: str, ledger: Any, lease_batch: int, step: str,
                 lease_ttl_s: float, cache_parts: tuple[str, ...] | None = None):
        self.teacher = Teacher.model_validate(teacher_json)
        env = self.teacher.api_key_env
        api_key = os.environ.get(env) if env else None
        if env and not api_key:
            raise TeacherRejected(f"environment variable {env} (teachers[].api_key_env) is not set on this node")
        self.cache = AnswerCache(Workdir(workdir), self.teacher.name, cache_parts)
        self.cache_lock = threading.Lock()
        context = ray.get_runtime_context()
        self.node = context.get_node_id()[:12]
        self.api_key = api_key
        self.leases = LeaseClient(ledger, lease_batch, holder=f"worker:{context.get_actor_id()}", step=step,
                                  ttl_s=lease_ttl_s)  # shared by this worker's concurrent batches
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
            # One session for the worker's life, made on its event loop: connections are kept alive
            # across the batches it runs at once and back to back.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=15))
            self.client = TeacherClient(self.teacher, self.api_key, self.leases, session)
        self.active += 1
        client = self.client
        try:
            send, done = await self._claim(rows)
            answered = await asyncio.gather(*(self._one(client, row) for row in send))
            return done + list(answered)
        finally:
            self.active -= 1
            self.leases.flush()
            if self.active == 0:
                # Idle: give unused leases back to the other workers. The connections stay open for the
                # next batch (the keep-alive timeout closes them when no batch comes).
                self.leases.close()

    async def _claim(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The rows to send, and the results of rows not to send (answered already in this run)."""
        by_key = {row["key"]: row for row in rows}
        send: list[dict[str, Any]] = []
        done: list[dict[str, Any]] = []
        waiting = list(by_key)
        while waiting:
            claim = await self.leases.claim(waiting)
            answered = set(claim["answered"])
            if claim["recheck"]:
                # Their last holder died asking: the answer may have reached the cache just before.
                cached = await asyncio.to_thread(self.cache.load)
                for key in claim["recheck"]:
                    if key in cached:
                        answered.add(key)
                        self.leases.done(key, True)
            done += [self._result(key, None, None, 0.0, 0) for key in answered]
            send += [by_key[k] for k in claim["send"] if k not in answered]
            waiting = claim["busy"]
            if waiting:  # another live worker is asking for these right now: wait for its outcome
                await asyncio.sleep(0.5)
        return send, done

    def _result(self, key: str, error: str | None, kind: str | None, cost: float, attempts: int) -> dict[str, Any]:
        return {"key": key, "error": error, "error_kind": kind, "cost_usd": cost, "attempts": attempts,
                "node": self.node}

    async def _one(self, client: TeacherClient, row: dict[str, Any]) -> dict[str, Any]:
        answer = await client.complete(None, row["sample"], idempotency_key=row["key"], messages_json=row["request"])
        if answer.error is None:
            record = {"key": row["key"], "teacher": self.teacher.name, "model": self.teacher.model,
                      "sample": row["sample"], "node": self.node, **answer.to_dict()}
            with self.cache_lock:
                self.cache.put(record)
        self.leases.done(row["key"], answer.error is None)  # after the answer is durable
        return self._result(row["key"], answer.error, answer.error_kind, answer.cost_usd, answer.attempts)


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
    stopped_by_budget = False
    for teacher in config.teachers:
        result = _generate_one(config, teacher, prompts, workdir, echo)
        rows_out.extend(result.pop("rows"))
        report["teachers"][teacher.name] = result
        stopped_by_budget |= result["errors_by_kind"].get("budget", 0) > 0

    workdir.write_table(pa.Table.from_pylist(rows_out, schema=ANSWER_SCHEMA), STEP, "answers")
    errors = Counter(r["error_kind"] for r in rows_out if r["error"])
    ledgers = {t.name: read_spend(workdir, t.name) for t in config.teachers}
    spent_all = sum(ledger["spent_usd"] for ledger in ledgers.values())
    report.update({
        "rows": len(rows_out), "answered": len(rows_out) - sum(errors.values()), "errors_by_kind": dict(errors),
        "spent_usd_total": round(sum(t["spent_usd_total"] for t in report["teachers"].values()), 6),
        "spent_usd_all_steps": round(spent_all, 6), "budget_usd": config.budget_usd,
        "spend_by_step": spend_by_step(workdir, [t.name for t in config.teachers]),
        "estimate_rest_usd": round(sum(t["estimate_rest_usd"] for t in report["teachers"].values()), 6),
    })
    workdir.write_json(report, STEP, "report.json")
    record.counts = {k: report[k] for k in ("rows", "answered", "errors_by_kind", "spent_usd_total")}
    record.timings = {"total": time.perf_counter() - t0}
    status = "partial" if errors else "complete"
    manifest = write_manifest(workdir, record, status)
    echo(summary(report, workdir.uri_of(STEP), status))
    if stopped_by_budget:
        raise BudgetReached(f"generate stopped at budget_usd={config.budget_usd}: ${spent_all:.4f} spent on the "
                            f"teachers by every step so far; {errors['budget']} answers not asked (about "
                            f"${report['estimate_rest_usd']:.4f} more). Raise budget_usd and run again to resume; "
                            "nothing paid for is asked again.")
    return manifest


def _generate_one(config: PipelineConfig, teacher: Teacher, prompts: list[dict[str, Any]], workdir: Workdir,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    work = []
    for prompt in prompts:
        messages = teacher_messages(config.task, prompt["messages"])
        for sample in range(teacher.samples):
            key = answer_key(teacher, messages, sample)
            work.append({"key": key, "sample": sample, "request": json.dumps(messages, ensure_ascii=False),
                         "prompt": prompt})
    asked = ask_teacher(teacher, work, workdir, config.generate, config.budget_usd, echo,
                        label=f"generate[{teacher.name}]", step="generate", limit=config.generate.limit,
                        other_teachers=[t.name for t in config.teachers if t.name != teacher.name],
                        mode=config.generate.mode)
    answers, results, nodes = asked["answers"], asked["results"], asked["nodes"]
    rows, errors = [], Counter()
    for w in work:
        row = answer_row(teacher, w, answers.get(w["key"]), results.get(w["key"]),
                         "not asked in this run (generate.limit, or the run stopped)")
        if row["error"] is not None:
            errors[row["error_kind"]] += 1
        rows.append(row)
    cached_spend = sum(a.get("cost_usd") or 0.0 for a in answers.values())
    mean_cost = cached_spend / len(answers) if answers else 0.0
    return {
        "rows": rows, "answers_needed": len(work), "cached_before": asked["cached_before"],
        "asked": len(results), "answered_now": sum(1 for r in results.values() if not r["error"]),
        "errors_by_kind": dict(errors), "spent_usd_this_run": round(asked["spent_this_run"], 6),
        "spent_usd_total": round(asked["spent_step_total"], 6),
        "estimate_rest_usd": round(mean_cost * sum(errors.values()), 6), "calls_by_node": dict(nodes),
        "ledger": asked["ledger"], **({"batch": asked["batch"]} if asked.get("batch") else {}),
    }


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
            _fan_out(teacher, pending, workdir, generate, ledger, echo, label, step, cache_parts, results, nodes,
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


def _fan_out(teacher: Teacher, pending: list[dict[str, Any]], workdir: Workdir, generate: Generate, ledger: Any,
             echo: Callable[[str], None], label: str, step: str, cache_parts: tuple[str, ...] | None,
             results: dict[str, dict[str, Any]], nodes: Counter[str], before: dict[str, Any]) -> None:
    """Ray Data workers ask for `pending`; results land in `results` as batches end."""
    ds = ray.data.from_items([{"key": w["key"], "sample": w["sample"], "request": w["request"]} for w in pending])
    mapped = ds.map_batches(
        TeacherWorker, batch_size=generate.batch_size, batch_format="pyarrow",
        # Several batches per worker at once: their __call__ threads hand the rows to the worker's
        # event loop (true multi-threading, or Ray Data would run one UDF call at a time per actor).
        compute=ray.data.ActorPoolStrategy(size=generate.num_workers,
                                           max_concurrent_calls_per_actor=generate.batches_per_worker,
                                           enable_true_multi_threading=True),
        fn_constructor_kwargs={"teacher_json": teacher.model_dump(mode="json"), "workdir": workdir.uri,
                               "ledger": ledger, "lease_batch": _lease_batch(teacher, generate), "step": step,
                               "lease_ttl_s": generate.lease_ttl_s, "cache_parts": cache_parts},
        num_cpus=0.5, scheduling_strategy=generate.scheduling_strategy,
    )
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.to_pylist():
                    results[r["key"]] = r
                    nodes[r["node"]] += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            failure.append(exc)

    consumer = threading.Thread(target=consume, daemon=True, name="generate-results")
    consumer.start()
    progress = _Progress(label, ledger, len(pending), before, results, generate.progress_every_s, echo)
    try:
        while consumer.is_alive():
            consumer.join(timeout=1.0)
            stalled = progress.stalled_for()
            if stalled >= generate.stall_timeout_s:
                state = progress.last_state or {}
                raise TeacherStalled(
                    f"{label}: no answer and no row ended for {stalled:.0f} s (generate.stall_timeout_s="
                    f"{generate.stall_timeout_s:g}); {len(results)}/{len(pending)} rows done; in flight "
                    f"{state.get('in_flight', '?')} held by {state.get('holders', '?')} holders, "
                    f"{state.get('expired_holders', 0)} dead holders' leases reclaimed, "
                    f"{state.get('throttled', 0)} 429s. Answers so far are kept: run again to resume.")
    finally:
        progress.stop()
    if failure:
        rejected = _rejection(failure[0])
        if rejected is not None:
            raise rejected from None
        raise failure[0]


class _Progress:
    """A line every `every_s` seconds from the ledger's counters (answers arrive long before their
    batch ends): answered, rate, in flight, row errors so far, spend, 429s. Also the driver's stall
    clock: the last time an answer arrived or a row ended."""

    def __init__(self, name: str, ledger: Any, total: int, before: dict[str, Any], results: dict[str, Any],
                 every_s: float, echo: Callable[[str], None]):
        self.name, self.ledger, self.total, self.before = name, ledger, total, before
        self.results, self.every_s, self.echo = results, every_s, echo
        self.start = self.moved = time.monotonic()
        self.seen: tuple[int, int] = (-1, -1)
        self.last_state: dict[str, Any] | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="generate-progress")
        self.thread.start()

    def _poll(self) -> dict[str, Any] | None:
        try:
            state = ray.get(self.ledger.state.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort; the step reports errors itself
            return None
        seen = (state["ended"], len(self.results))
        if seen != self.seen:
            self.seen, self.moved = seen, time.monotonic()
        self.last_state = state
        return state

    def stalled_for(self) -> float:
        return time.monotonic() - self.moved

    def _loop(self) -> None:
        tick = min(self.every_s, 1.0)
        last_line = time.monotonic()
        while not self.done.wait(tick):
            state = self._poll()
            if state is None or time.monotonic() - last_line < self.every_s:
                continue
            last_line = time.monotonic()
            elapsed = time.monotonic() - self.start
            answered = state["answered"] - self.before["answered"]
            errors = sum(1 for r in list(self.results.values()) if r["error"])
            self.echo(f"{self.name}: {answered}/{self.total} answered, "
                      f"{answered / elapsed:.1f}/s, {state['in_flight']} in flight, {errors} row errors, "
                      f"${state['spent_usd']:.4f} spent on this teacher in all, {state['throttled']} 429s"
                      + (f", {state['expired_holders']} dead workers' leases reclaimed" if state["expired_holders"]
                         else ""))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _lease_batch(teacher: Teacher, generate: Generate) -> int:
    """Permits (and slots) leased per ledger call: a worker's share of the concurrency, up to 128 (slots
    beyond a fair share go back when other workers wait for some; permits only ever reserve rate and
    budget that the worker is about to use)."""
    return max(1, min(128, teacher.max_concurrency // generate.num_workers))


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


def summary(report: dict[str, Any], where: str, status: str) -> str:
    budget = f" of budget_usd {report['budget_usd']:g}" if report.get("budget_usd") is not None else ""
    lines = [f"generate: {report['answered']}/{report['rows']} answers in {where} ({status}); "
             f"spent ${report['spent_usd_total']:.4f} on generating in all; "
             f"${report['spent_usd_all_steps']:.4f} on the teachers by every step{budget}"]
    for name, t in report["teachers"].items():
        by_step = report["spend_by_step"].get(name) or {}
        ledger = t.get("ledger") or {}
        lines.append(f"  {name}: asked {t['asked']}, answered now {t['answered_now']}, cached before "
                     f"{t['cached_before']}, this run ${t['spent_usd_this_run']:.4f}, errors {t['errors_by_kind'] or 0}"
                     + (f", calls by node {t['calls_by_node']}" if t["calls_by_node"] else "")
                     + (", spend by step " + ", ".join(f"{k} ${v:.4f}" for k, v in by_step.items()) if by_step else "")
                     + (f"; {ledger['reclaimed']} answer keys claimed again after their worker died (sent by "
                        "it or not)"
                        if ledger.get("reclaimed") else ""))
    if report["errors_by_kind"]:
        lines.append(f"  rows with errors are asked again on the next run: {report['errors_by_kind']}")
    return "\n".join(lines)
