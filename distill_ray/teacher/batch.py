"""generate.mode batch: the teacher's answers through the provider's Batch API (OpenAI's Files + Batches).

A batch costs `teacher.batch_price_factor` of the online price (OpenAI: half) and is answered within its
completion window (24 h) instead of at once. The pending requests are cut into chunks that fit the
provider's limits (`generate.batch_max_requests` lines, `generate.batch_max_bytes` of JSONL); each chunk
is one input file and one batch. The driver polls the batches until each is terminal, then reads its
output and error files: every answer goes to the answer cache exactly as a live answer would, and its
cost, at the batch price, to the teacher's ledger.

**A killed run never submits a chunk twice.** The chunks live in a state file in the workdir,
`teacher/batches/<teacher>.json` (the eval judge's: `teacher/batches/<cache parts>.json`), written before
and after each remote step: the chunk and its keys before the upload; its `input_file_id` right after
the upload; its `batch_id` right after the batch is created (tagged with metadata `distill_ray_chunk`);
`processed` once its answers are cached and its spend booked. A rerun polls the batches it finds there
instead of submitting their keys again; a chunk that has a file but no batch id (killed between the
create call and its record) is first looked for among the provider's batches (`batches.list()`, by
input file or metadata) and only created when none is found. A chunk killed before its file was
recorded is dropped: an unused upload costs nothing.

Rows a batch did not answer (a line's 4xx/5xx, a failed, expired or cancelled batch, a line missing
from both files) become result rows with their error; they are asked again on the next run, in a new
chunk. Spend is booked only when a batch has been read, so the window between booking it and marking
the chunk processed (one file write) is the one place a kill can count a batch's spend twice in the
ledger; it can never make the provider bill twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import openai
import ray

from distill_ray.config.schema import Generate, Teacher
from distill_ray.storage import Workdir
from distill_ray.teacher.batch_api import (
    TERMINAL,
    ApiErrors,
    Transient,
    batch_client,
    batch_url,
    finished_at,
    line_error,
    plan_chunks,
)
from distill_ray.teacher.cache import AnswerCache
from distill_ray.teacher.client import (
    Answer,
    RetryableError,
    cost_usd,
    estimate_tokens,
    parse_body,
    request_body,
    usage_of,
)
from distill_ray.teacher.errors import TeacherStalled

LIST_SLACK_S = 300  # clock skew allowed when looking for a batch created before its id was recorded


def state_path(teacher: str, cache_parts: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Where a teacher's batch chunks are recorded (the eval judge's cache parts get their own file)."""
    name = "-".join(cache_parts) if cache_parts else teacher
    return ("teacher", "batches", f"{name}.json")


def submitted_keys(teacher: Teacher, workdir: Workdir, cache_parts: tuple[str, ...] | None = None) -> set[str]:
    """Answer keys in chunks uploaded (perhaps submitted) and not yet read back: a rerun's batch will
    answer them, so nothing else (the step's live preflight request) should ask for them."""
    state = workdir.read_json(*state_path(teacher.name, cache_parts)) or {"chunks": []}
    return {key for chunk in state["chunks"] if chunk.get("input_file_id") and not chunk.get("processed")
            for key in chunk["keys"]}


def run_batch(teacher: Teacher, pending: list[dict[str, Any]], workdir: Workdir, generate: Generate, ledger: Any,
              echo: Callable[[str], None], *, label: str, step: str, results: dict[str, dict[str, Any]],
              cache_parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Ask for `pending` ({key, sample, request: JSON messages}) through the teacher's Batch API.

    Resumes the batches a previous run submitted, submits the rest in new chunks (as far as the budget
    reaches), waits for every batch to end, caches its answers and books its spend in `ledger`. Fills
    `results[key]` for every pending key dealt with.

    Returns:
        A summary for the step's report: batch ids, chunks submitted and resumed, lines answered and
        failed, errors by kind, cost at the batch price.

    Raises:
        TeacherRejected: the provider refused the key or does not offer the Files/Batches API.
        TeacherStalled: polling failed for generate.stall_timeout_s (the batches keep running; rerun).
    """
    return _BatchRun(teacher, workdir, generate, ledger, echo, label, step, results, cache_parts).run(pending)


class _BatchRun:
    def __init__(self, teacher: Teacher, workdir: Workdir, generate: Generate, ledger: Any,
                 echo: Callable[[str], None], label: str, step: str, results: dict[str, dict[str, Any]],
                 cache_parts: tuple[str, ...] | None):
        self.teacher, self.workdir, self.generate, self.ledger = teacher, workdir, generate, ledger
        self.echo, self.label, self.step, self.results, self.cache_parts = echo, label, step, results, cache_parts
        self.path = state_path(teacher.name, cache_parts)
        self.state = workdir.read_json(*self.path) or {"teacher": teacher.name, "chunks": []}
        self.client = batch_client(teacher)
        self.url = batch_url(teacher)
        self.summary: dict[str, Any] = {"state": workdir.uri_of(*self.path), "batches": [], "submitted": 0,
                                        "resumed": 0, "lines_submitted": 0, "answered": 0, "failed": 0,
                                        "not_sent_budget": 0, "errors_by_kind": Counter(), "cost_usd": 0.0}

    def save(self) -> None:
        self.workdir.write_json(self.state, *self.path)

    def run(self, pending: list[dict[str, Any]]) -> dict[str, Any]:
        self.pending = {w["key"]: w for w in pending}
        try:
            self._resume()
            waiting = {key for chunk in self._open_chunks() for key in chunk["keys"]}
            self._submit([w for w in pending if w["key"] not in waiting])
            self._poll()
        except Transient as exc:
            raise TeacherStalled(f"{self.label}: the Batch API kept failing ({exc}); what was submitted is recorded "
                                 f"in {self.summary['state']}: run again to resume") from exc
        summary = self.summary
        summary["errors_by_kind"] = dict(summary["errors_by_kind"])
        summary["cost_usd"] = round(summary["cost_usd"], 9)
        self.echo(f"{self.label}: batches {', '.join(summary['batches']) or 'none'}: {summary['submitted']} submitted, "
                  f"{summary['resumed']} resumed; {summary['answered']} answered, {summary['failed']} failed"
                  + (f" {summary['errors_by_kind']}" if summary["errors_by_kind"] else "")
                  + (f", {summary['not_sent_budget']} not sent (budget_usd)" if summary["not_sent_budget"] else "")
                  + f"; ${summary['cost_usd']:.4f} at the batch price")
        return summary

    def _open_chunks(self) -> list[dict[str, Any]]:
        return [c for c in self.state["chunks"] if c.get("batch_id") and not c["processed"]]

    # Resuming what a killed run left.

    def _resume(self) -> None:
        changed = False
        for chunk in self.state["chunks"]:
            if chunk["processed"]:
                continue
            if not chunk.get("input_file_id"):  # killed before the upload was recorded: start it afresh
                chunk.update(processed=True, status="abandoned", keys=[], samples=[])
                changed = True
            elif not chunk.get("batch_id"):
                found = self._find_batch(chunk)
                if found is None and all(key in self.pending for key in chunk["keys"]):
                    found = self._create(chunk, resumed=True)
                if found is None:  # its file is gone, or some of its keys were answered since: start afresh
                    chunk.update(processed=True, status="abandoned", keys=[], samples=[])
                if found is not None:
                    chunk.update(batch_id=found.id, status=found.status)
                    self.echo(f"{self.label}: batch {found.id} of chunk {chunk['id']} found and resumed")
                changed = True
        if changed:
            self.save()
        for chunk in self._open_chunks():
            self.summary["resumed"] += 1
            self.summary["batches"].append(chunk["batch_id"])
            self.echo(f"{self.label}: resuming batch {chunk['batch_id']} ({len(chunk['keys'])} requests, "
                      f"{chunk['status']})")

    def _find_batch(self, chunk: dict[str, Any]) -> Any | None:
        """The provider's batch for a chunk whose batch id was never recorded, if it made one."""
        with self._api("look for the batch of chunk " + chunk["id"]):
            for batch in self.client.batches.list(limit=100):  # newest first; pages on by itself
                metadata = batch.metadata or {}
                if batch.input_file_id == chunk["input_file_id"] or metadata.get("distill_ray_chunk") == chunk["id"]:
                    return batch
                if batch.created_at < chunk["created_at"] - LIST_SLACK_S:
                    break
        return None

    # Submitting new chunks.

    def _submit(self, todo: list[dict[str, Any]]) -> None:
        t = self.teacher
        lines, estimates = [], []
        for w in todo:
            messages = json.loads(w["request"])
            line = {"custom_id": w["key"], "method": "POST", "url": self.url,
                    "body": request_body(t, messages, w["sample"])}
            lines.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
            estimates.append(cost_usd(t, estimate_tokens(messages), t.max_tokens, batch=True))
        chunks, too_large = plan_chunks([len(line) for line in lines], self.generate.batch_max_requests,
                                        self.generate.batch_max_bytes)
        for index in too_large:
            self._result(todo[index]["key"], f"request of {len(lines[index])} bytes is larger than "
                         f"generate.batch_max_bytes={self.generate.batch_max_bytes}", "too_large", 0)
        left = self._budget_left()
        for indexes in chunks:
            # The budget: only the lines whose estimate (prompt estimate + max_tokens, batch price) fits.
            fits = []
            for index in indexes:
                if left is None or estimates[index] <= left:
                    fits.append(index)
                    left = None if left is None else left - estimates[index]
                else:
                    self._result(todo[index]["key"], "budget_usd reached: not sent", "budget", 0)
                    self.summary["not_sent_budget"] += 1
            if fits:
                self._submit_chunk([todo[i] for i in fits], b"".join(lines[i] for i in fits),
                                   sum(estimates[i] for i in fits))

    def _budget_left(self) -> float | None:
        state = ray.get(self.ledger.state.remote())
        if state["budget_usd"] is None:
            return None
        in_batches = sum(c.get("est_cost_usd", 0.0) for c in self._open_chunks())  # not booked until read
        return state["budget_usd"] - state["spent_usd"] - state["reserved_usd"] - in_batches

    def _submit_chunk(self, rows: list[dict[str, Any]], content: bytes, est_cost: float) -> None:
        chunk = {"id": f"{self.teacher.name}-{uuid.uuid4().hex[:12]}", "keys": [w["key"] for w in rows],
                 "samples": [w["sample"] for w in rows], "est_cost_usd": est_cost, "bytes": len(content),
                 "created_at": int(time.time()), "input_file_id": None, "batch_id": None, "status": "uploading",
                 "processed": False}
        self.state["chunks"].append(chunk)
        self.save()
        with self._api("upload the batch input file"):
            uploaded = self.client.files.create(file=(f"{chunk['id']}.jsonl", content), purpose="batch")
        chunk.update(input_file_id=uploaded.id, status="uploaded")
        self.save()
        batch = self._create(chunk)
        chunk.update(batch_id=batch.id, status=batch.status)
        self.save()
        self.summary["submitted"] += 1
        self.summary["lines_submitted"] += len(rows)
        self.summary["batches"].append(batch.id)
        self.echo(f"{self.label}: batch {batch.id} submitted ({len(rows)} requests, {len(content)} bytes, at most "
                  f"${est_cost:.4f} at the batch price by estimate)")

    def _create(self, chunk: dict[str, Any], resumed: bool = False) -> Any | None:
        """Create the batch of an uploaded chunk (None: resuming, and its file is gone)."""
        with self._api("create the batch"):
            try:
                return self.client.batches.create(input_file_id=chunk["input_file_id"], endpoint=self.url,
                                                  completion_window=self.generate.batch_completion_window,
                                                  metadata={"distill_ray_chunk": chunk["id"]})
            except openai.NotFoundError:
                if not resumed:
                    raise
                return None

    def _api(self, what: str) -> ApiErrors:
        return ApiErrors(self.teacher, what)

    # Waiting, then reading the results.

    def _poll(self) -> None:
        every_s, last_line, failing_since = self.generate.progress_every_s, time.monotonic(), None
        start = time.monotonic()
        while open_chunks := self._open_chunks():
            statuses: Counter[str] = Counter()
            done, total = 0, 0
            for chunk in open_chunks:
                try:
                    with self._api("poll the batch"):
                        batch = self.client.batches.retrieve(chunk["batch_id"])
                except openai.NotFoundError:  # deleted at the provider: its keys are asked again next run
                    self._lost(chunk)
                    continue
                except Transient as exc:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since >= self.generate.stall_timeout_s:
                        raise TeacherStalled(
                            f"{self.label}: cannot poll batch {chunk['batch_id']} for {self.generate.stall_timeout_s:g}"
                            f" s ({exc}); the batches run on at the provider: run again to resume them") from exc
                    continue
                failing_since = None
                counts = batch.request_counts
                if batch.status not in TERMINAL:
                    statuses[batch.status] += 1
                    done += (counts.completed + counts.failed) if counts else 0
                    total += counts.total if counts and counts.total else len(chunk["keys"])
                if batch.status != chunk["status"]:
                    chunk["status"] = batch.status
                    self.save()
                if batch.status in TERMINAL:
                    self._read(chunk, batch)
            if statuses and time.monotonic() - last_line >= every_s:
                last_line = time.monotonic()
                self.echo(f"{self.label}: waiting {time.monotonic() - start:.0f} s on {sum(statuses.values())} "
                          f"batches ({', '.join(f'{n} {status}' for status, n in sorted(statuses.items()))}); "
                          f"{done}/{total} requests done")
            if self._open_chunks():
                time.sleep(self.generate.batch_poll_s)

    def _read(self, chunk: dict[str, Any], batch: Any) -> None:
        """A terminal batch: cache its answers, book its spend, give every key of it its result."""
        outcome: dict[str, dict[str, Any]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            with self._api("download the batch results"):
                content = self.client.files.content(file_id).content
            for raw in content.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    outcome[line.get("custom_id")] = line
        t, duration = self.teacher, max(0.0, float((finished_at(batch) or batch.created_at) - batch.created_at))
        cache = AnswerCache(self.workdir, t.name, self.cache_parts)
        answered, requests, cost_total, kinds = [], 0, 0.0, Counter()
        try:
            for key, sample in zip(chunk["keys"], chunk["samples"], strict=True):
                line = outcome.get(key)
                if line is None:
                    error, kind = self._missing(batch)
                    self._result(key, error, kind, 0)
                    kinds[kind] += 1
                    continue
                requests += 1
                response = line.get("response") or {}
                status, body = response.get("status_code"), response.get("body")
                if status != 200:
                    error, kind = line_error(status, body, line.get("error"))
                    self._result(key, error, kind, 1)
                    kinds[kind] += 1
                    continue
                try:
                    parsed = parse_body(json.dumps(body).encode())
                except RetryableError as exc:  # billed all the same, when the body says what it used
                    usage = usage_of(body.get("usage") or {}) if isinstance(body, dict) else {}
                    cost = cost_usd(t, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0,
                                    usage.get("cached_tokens") or 0, batch=True)
                    cost_total += cost
                    self._result(key, str(exc), exc.kind, 1, cost)
                    kinds[exc.kind] += 1
                    continue
                prompt = parsed["prompt_tokens"] or self._estimate(key)
                completion = parsed["completion_tokens"] or max(1, len(parsed["completion"]) // 4)
                cost = cost_usd(t, prompt, completion, parsed["cached_tokens"], batch=True)
                answer = Answer(**{**parsed, "prompt_tokens": prompt, "completion_tokens": completion},
                                attempts=1, cost_usd=cost, latency_s=duration)
                cache.put({"key": key, "teacher": t.name, "model": t.model, "sample": sample, "node": "batch",
                           **answer.to_dict()})
                cost_total += cost
                answered.append(key)
                self._result(key, None, None, 1, cost)
        finally:
            cache.close()  # what was cached is durable before the spend is booked
        ray.get(self.ledger.add_spend.remote(self.step, cost_total, requests, len(answered)))
        ray.get(self.ledger.mark_answered.remote(answered))
        # Its keys are no longer needed (answers are in the cache, failures asked again): a small state file.
        chunk.update(processed=True, status=batch.status, requests=len(chunk["keys"]), keys=[], samples=[],
                     answered=len(answered), failed=sum(kinds.values()), errors_by_kind=dict(kinds),
                     cost_usd=round(cost_total, 9), output_file_id=batch.output_file_id,
                     error_file_id=batch.error_file_id)
        self.save()
        summary = self.summary
        summary["answered"] += len(answered)
        summary["failed"] += sum(kinds.values())
        summary["errors_by_kind"].update(kinds)
        summary["cost_usd"] += cost_total
        self.echo(f"{self.label}: batch {batch.id} {batch.status}: {len(answered)}/{len(chunk['keys'])} answered"
                  + (f", errors {dict(kinds)}" if kinds else "") + f", ${cost_total:.4f}")

    def _lost(self, chunk: dict[str, Any]) -> None:
        for key in chunk["keys"]:
            self._result(key, f"batch {chunk['batch_id']} not found at the provider", "batch_missing", 0)
        self.summary["failed"] += len(chunk["keys"])
        self.summary["errors_by_kind"]["batch_missing"] += len(chunk["keys"])
        chunk.update(processed=True, status="not_found", requests=len(chunk["keys"]), keys=[], samples=[])
        self.save()
        self.echo(f"{self.label}: batch {chunk['batch_id']} is not found at the provider; its requests are asked "
                  "again on the next run")

    def _missing(self, batch: Any) -> tuple[str, str]:
        """The error of a key the batch's files do not mention."""
        if batch.status == "failed":
            errors = getattr(batch.errors, "data", None) or []
            detail = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors)
            return f"batch {batch.id} failed: {detail or 'no reason given'}", "batch_failed"
        if batch.status in ("expired", "cancelled"):
            return f"batch {batch.id} {batch.status} before this request was answered", f"batch_{batch.status}"
        return f"batch {batch.id} {batch.status} without this request in its output or error file", "batch_missing"

    def _estimate(self, key: str) -> int:
        row = self.pending.get(key)
        return estimate_tokens(json.loads(row["request"])) if row else 0

    def _result(self, key: str, error: str | None, kind: str | None, attempts: int, cost: float = 0.0) -> None:
        if key in self.pending:  # a resumed batch may hold keys this run does not ask for (cached, limit)
            self.results[key] = {"key": key, "error": error, "error_kind": kind, "cost_usd": cost,
                                 "attempts": attempts, "node": "batch"}
