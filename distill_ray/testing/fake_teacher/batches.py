"""OpenAI's Files + Batches API in the fake teacher (and Azure's copy under ``/openai``): a batch input file
validated as OpenAI does, its lines answered over ``batch_latency_s``, output and error files written."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from distill_ray.testing.fake_teacher.config import (
    AZURE_BATCH_ENDPOINTS,
    BATCH_ENDPOINT,
    BATCH_WINDOW_S,
    ERROR_FAULTS,
    last_user_text,
    prompt_key,
)
from distill_ray.testing.fake_teacher.wire import (
    AZURE_NOT_FOUND,
    AZURE_UNAUTHORIZED,
    ERRORS,
    api_error,
    azure_body,
    chat_request,
    error_body,
    unsupported_body,
)


@dataclass
class Batch:
    """One batch: its wire object (updated in place as it runs) and the lines it has answered so far."""

    info: dict
    started: float  # time.monotonic() at creation
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set by a cancel
    task: asyncio.Task | None = None
    output_lines: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    billable: list[tuple[str, dict]] = field(default_factory=list)  # (prompt key, usage) of each answered line


def batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_batch_input(content: bytes, endpoint: str, max_requests: int, max_bytes: int) -> tuple[list, list]:
    """Validate a batch input file as OpenAI does before it runs anything.

    Args:
        content: The JSONL file: one ``{"custom_id", "method": "POST", "url", "body"}`` per line.
        endpoint: The batch's endpoint, which every line's ``url`` must name.
        max_requests: The most request lines a batch may hold.
        max_bytes: The largest input file a batch may read.

    Returns:
        (the request lines, the errors: ``{"code", "message", "param", "line"}`` with 1-based line numbers);
        the lines are only good to run when there are no errors.
    """
    if len(content) > max_bytes:
        return [], [batch_error("file_too_large", f"The input file is {len(content)} bytes; a batch reads "
                                 f"at most {max_bytes} bytes.")]
    numbered = [(number, raw) for number, raw in enumerate(content.splitlines(), 1) if raw.strip()]
    if not numbered:
        return [], [batch_error("empty_file", "The input file has no request lines.")]
    if len(numbered) > max_requests:
        return [], [batch_error("too_many_requests", f"The input file has {len(numbered)} requests; a batch "
                                 f"holds at most {max_requests}.")]
    lines, errors, custom_ids, first_model = [], [], set(), None
    for number, raw in numbered:
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
            continue
        missing = [name for name in ("custom_id", "method", "url", "body") if not isinstance(line, dict)
                   or name not in line]
        if missing:
            errors.append(batch_error("missing_required_parameter", f"Missing required parameter: "
                                       f"'{missing[0]}'.", number, missing[0]))
        elif not isinstance(line["custom_id"], str):
            errors.append(batch_error("invalid_custom_id", "The custom_id must be a string.", number, "custom_id"))
        elif line["custom_id"] in custom_ids:
            errors.append(batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                       "another request. The custom_id parameter must be unique for each request "
                                       "in a batch.", number, "custom_id"))
        elif line["method"] != "POST":
            errors.append(batch_error("invalid_method", f"The method {line['method']!r} is not supported; "
                                       "use 'POST'.", number, "method"))
        elif line["url"] != endpoint:
            errors.append(batch_error("invalid_url", f"The URL {line['url']!r} of this request does not match "
                                       f"the batch endpoint {endpoint!r}.", number, "url"))
        elif not isinstance(line["body"], dict):
            errors.append(batch_error("invalid_body", "The body must be a JSON object.", number, "body"))
        elif first_model is not None and line["body"].get("model", first_model) != first_model:
            errors.append(batch_error("mismatched_model", f"The model {line['body']['model']!r} differs from "
                                       f"{first_model!r} of the lines before it; all lines of a batch must name "
                                       "the same model.", number, "body.model"))
        else:
            custom_ids.add(line["custom_id"])
            first_model = first_model if first_model is not None else line["body"].get("model")
            lines.append(line)
    return lines, errors



class Batches:
    """The file and batch routes of ``FakeTeacherServer`` (its state: ``files``, ``batches``, ``ids``)."""

    # Files and batches (OpenAI's Files + Batches API, and Azure's copy of it under /openai).

    def _openai_route(self, handler):
        async def route(request: web.Request) -> web.Response:
            if not self._authorized(request):
                return api_error(401, *ERRORS[401])
            return await handler(request)
        return route

    def _azure_route(self, handler):
        async def route(request: web.Request) -> web.Response:
            if "api-version" not in request.query:
                return web.json_response(azure_body(404, AZURE_NOT_FOUND), status=404)
            if not self._authorized(request, azure=True):
                return web.json_response(azure_body(401, AZURE_UNAUTHORIZED), status=401)
            return await handler(request)
        return route

    def _new_id(self, prefix: str) -> str:
        self.ids[prefix] += 1
        return f"{prefix}fake{self.ids[prefix]:08d}{secrets.token_hex(4)}"

    def _store_file(self, filename: str, content: bytes, purpose: str) -> dict:
        file = {"id": self._new_id("file-"), "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                "status_details": None}
        self.files[file["id"]] = {"object": file, "content": content}
        return file

    async def create_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField):
            return api_error(400, "Missing required parameter: 'file'.", "invalid_request_error", param="file")
        if purpose != "batch":
            return api_error(400, f"Invalid value for 'purpose': {purpose!r}. The fake teacher takes only "
                              "'batch'.", "invalid_request_error", param="purpose")
        return web.json_response(self._store_file(upload.filename or "upload.jsonl", upload.file.read(), purpose))

    async def list_files(self, request: web.Request) -> web.Response:
        data = [stored["object"] for stored in reversed(self.files.values())]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def retrieve_file(self, request: web.Request) -> web.Response:
        stored = self.files.get(request.match_info["file_id"])
        return web.json_response(stored["object"]) if stored else self._no_file(request.match_info["file_id"])

    async def file_content(self, request: web.Request) -> web.Response:
        stored = self.files.get(request.match_info["file_id"])
        if stored is None:
            return self._no_file(request.match_info["file_id"])
        return web.Response(body=stored["content"], content_type="application/octet-stream")

    def _no_file(self, file_id: str) -> web.Response:
        return api_error(404, f"No such File object: {file_id}", "invalid_request_error", param="id")

    async def create_batch(self, request: web.Request) -> web.Response:
        endpoints = AZURE_BATCH_ENDPOINTS if request.path.startswith("/openai/") else (BATCH_ENDPOINT,)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
        except (ValueError, TypeError) as exc:
            return api_error(400, f"Invalid request body: {exc!r}", "invalid_request_error")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                return api_error(400, f"Missing required parameter: '{name}'.", "invalid_request_error",
                                  "missing_required_parameter", name)
        if body["endpoint"] not in endpoints:
            return api_error(400, f"Invalid value for 'endpoint': {body['endpoint']!r}. The fake teacher batches "
                              f"only {' and '.join(endpoints)}.", "invalid_request_error", param="endpoint")
        if body["completion_window"] != "24h":
            return api_error(400, f"Invalid value for 'completion_window': {body['completion_window']!r}. "
                              "Supported values are: '24h'.", "invalid_request_error", param="completion_window")
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            return api_error(400, "Invalid type for 'metadata': expected an object.", "invalid_request_error",
                              param="metadata")
        stored = self.files.get(body["input_file_id"])
        if stored is None:
            return self._no_file(body["input_file_id"])
        now = int(time.time())
        info = {
            "id": self._new_id("batch_"), "object": "batch", "endpoint": body["endpoint"], "model": None,
            "errors": None, "input_file_id": body["input_file_id"], "completion_window": "24h",
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + BATCH_WINDOW_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None, "metadata": body.get("metadata"),
        }
        batch = Batch(info=info, started=time.monotonic())
        self.batches[info["id"]] = batch
        self.batches_created += 1
        batch.task = asyncio.create_task(self._run_batch(batch, stored["content"]))
        return web.json_response(info)

    async def list_batches(self, request: web.Request) -> web.Response:
        """Newest first, ``limit`` (1-100, default 20) at a time, after the batch ``after`` when given."""
        batches = [batch.info for batch in reversed(self.batches.values())]
        after = request.query.get("after")
        if after is not None:
            ids = [info["id"] for info in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return api_error(400, f"Invalid 'limit': {request.query.get('limit')!r}; expected 1 to 100.",
                              "invalid_request_error", param="limit")
        page = batches[:limit]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit})

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        return web.json_response(batch.info) if batch else self._no_batch(request.match_info["batch_id"])

    async def cancel_batch(self, request: web.Request) -> web.Response:
        """A validating or running batch turns "cancelling", then "cancelled" with the lines answered so far."""
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._no_batch(request.match_info["batch_id"])
        status = batch.info["status"]
        if status not in ("validating", "in_progress", "cancelling"):
            return api_error(400, f"Cannot cancel a batch with status '{status}'.", "invalid_request_error")
        if status != "cancelling":
            batch.info.update(status="cancelling", cancelling_at=int(time.time()))
            batch.wake.set()
        return web.json_response(batch.info)

    def _no_batch(self, batch_id: str) -> web.Response:
        return api_error(404, f"No batch found with id '{batch_id}'.", "invalid_request_error", param="batch_id")

    async def _run_batch(self, batch: Batch, content: bytes) -> None:
        """Validate, answer the lines evenly over 90 % of ``batch_latency_s``, finalize, then complete."""
        config, info = self.config, batch.info
        if config.batch_fail_all:
            lines, errors = [], [batch_error("batch_failed", "The batch failed (scripted: batch_fail_all).")]
        else:  # a 200 MB file takes a while to parse: off the event loop
            lines, errors = await asyncio.to_thread(parse_batch_input, content, info["endpoint"],
                                                    config.batch_max_requests, config.batch_max_bytes)
        if info["status"] == "cancelling":
            return self._finish_batch(batch, "cancelled")
        if errors:
            info.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
            return
        info.update(status="in_progress", in_progress_at=int(time.time()), model=lines[0]["body"].get("model"))
        info["request_counts"]["total"] = len(lines)
        answering_s = 0.9 * config.batch_latency_s
        for index, line in enumerate(lines):
            due = batch.started + answering_s * (index + 1) / len(lines)
            if due - time.monotonic() > 0.002:
                await self._nap(batch, due - time.monotonic())
            elif index % 256 == 0:
                await asyncio.sleep(0)  # let the server answer polls between long runs of lines
            if info["status"] == "cancelling":
                return self._finish_batch(batch, "cancelled")
            self._answer_batch_line(batch, line)
        info.update(status="finalizing", finalizing_at=int(time.time()))
        await self._nap(batch, batch.started + config.batch_latency_s - time.monotonic())
        self._finish_batch(batch, "completed")

    async def _nap(self, batch: Batch, seconds: float) -> None:
        """Sleep, but wake up at once when the batch is cancelled."""
        if seconds > 0:
            try:
                await asyncio.wait_for(batch.wake.wait(), seconds)
            except TimeoutError:
                pass

    def _answer_batch_line(self, batch: Batch, line: dict) -> None:
        status, body, key = self._batch_answer(line["body"])
        counts = batch.info["request_counts"]
        record = {"id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                  "response": {"status_code": status, "request_id": self._new_id("req_"), "body": body},
                  "error": None}
        if status == 200:
            counts["completed"] += 1
            batch.output_lines.append(json.dumps(record))
            batch.billable.append((key, body["usage"]))
        else:
            counts["failed"] += 1
            batch.error_lines.append(json.dumps(record))

    def _batch_answer(self, body: dict) -> tuple[int, dict, str | None]:
        """A batch line's (status, response body, prompt key): the live path's answer and faults, without
        rate limits, latency or a connection (so "timeout", "reset" and garbled-body faults become 500s)."""
        try:
            messages, model = chat_request(body)
        except (ValueError, KeyError, TypeError) as exc:
            self.by_kind["bad_request"] += 1
            return 400, error_body(f"Invalid request body: {exc!r}", "invalid_request_error"), None
        unsupported = self._unsupported(body)
        if unsupported is not None:
            return 400, unsupported_body(unsupported), None
        key = prompt_key(messages)
        attempt = self.attempts[key]
        self.attempts[key] += 1
        text = last_user_text(messages)
        fault = self._fault(key, text, attempt)
        if fault == "ok":
            return 200, self._completion(body, model, messages, text), key
        self.by_kind[fault] += 1
        if fault == "429":
            return 429, error_body("Rate limit reached (scripted fault).", "requests", "rate_limit_exceeded"), None
        message, type_, code = ERRORS[ERROR_FAULTS.get(fault, 500)]
        return ERROR_FAULTS.get(fault, 500), error_body(message, type_, code), None

    def _finish_batch(self, batch: Batch, status: str) -> None:
        """Bill the answered lines and write the output and error files (each only when it has lines)."""
        info = batch.info
        usage = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
        for key, line_usage in batch.billable:
            self._bill_usage(key, line_usage)
            self.by_kind["ok"] += 1
            self.batch_lines_billed += 1
            usage["input_tokens"] += line_usage["prompt_tokens"]
            usage["input_tokens_details"]["cached_tokens"] += line_usage["prompt_tokens_details"]["cached_tokens"]
            usage["output_tokens"] += line_usage["completion_tokens"]
            usage["output_tokens_details"]["reasoning_tokens"] += \
                line_usage["completion_tokens_details"]["reasoning_tokens"]
            usage["total_tokens"] += line_usage["total_tokens"]
        batch.billable = []
        for lines, name, field_name in ((batch.output_lines, "output", "output_file_id"),
                                        (batch.error_lines, "error", "error_file_id")):
            if lines:
                content = ("\n".join(lines) + "\n").encode()
                info[field_name] = self._store_file(f"{info['id']}_{name}.jsonl", content, "batch_output")["id"]
        info.update({"status": status, f"{status}_at": int(time.time()), "usage": usage})
