"""The Ray Data workers that ask a teacher online: a pool of actors sending their batches concurrently.

Each teacher gets one limiter actor (the ledger: its cluster-wide rpm, tpm, concurrency and the budget)
and a pool of Ray Data actors that send their batches concurrently (async, one aiohttp session each).
Each answer is cached durably as it arrives (`cache.py`); the driver prints progress from the ledger's
counters and stops the run when nothing moves for `generate.stall_timeout_s`.
"""

from __future__ import annotations

import asyncio
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

from distill_ray.config.schema import Generate, Teacher
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import AnswerCache
from distill_ray.teacher.client import TeacherClient
from distill_ray.teacher.errors import TeacherRejected, TeacherStalled
from distill_ray.teacher.ledger import LeaseClient

RESULT_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
                           ("cost_usd", pa.float64()), ("attempts", pa.int64()), ("node", pa.string())])


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


def fan_out(teacher: Teacher, pending: list[dict[str, Any]], workdir: Workdir, generate: Generate, ledger: Any,
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
