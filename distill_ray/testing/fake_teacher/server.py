"""The fake teacher's server in one process: its state, the chat routes, the ledger and the faults."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable

from aiohttp import web

from distill_ray.testing.fake_teacher.batches import Batch, Batches
from distill_ray.testing.fake_teacher.config import (
    BODY_FAULTS,
    ERROR_FAULTS,
    FakeTeacherConfig,
    last_user_text,
    load_answer_fn,
    prompt_key,
    text_of,
    tokenize,
)
from distill_ray.testing.fake_teacher.limits import RateWindow
from distill_ray.testing.fake_teacher.wire import (
    AZURE_NOT_FOUND,
    AZURE_UNAUTHORIZED,
    ERRORS,
    azure_body,
    chat_request,
    error_body,
    gone,
    reset_connection,
    token_logprobs,
    unsupported_body,
)


class FakeTeacherServer(Batches, RateWindow):
    """The server's state and handlers, in one process (``FakeTeacher`` runs it in another)."""

    def __init__(self, config: FakeTeacherConfig, answer_fn: Callable[[str], str] | None = None):
        self.config = config
        self.answer_fn = answer_fn or load_answer_fn(config.answer_fn)
        self.in_flight = 0
        self.pending = 0  # admitted by the rate limiter, not yet answered
        self.pending_tokens = 0
        self.completions = 0
        self.files: dict[str, dict] = {}  # file id -> {"object": the file object, "content": bytes}
        self.batches: dict[str, Batch] = {}  # in creation order
        self.ids: Counter[str] = Counter()  # per id prefix; never reset, so ids stay unique
        self.reset()

    def reset(self) -> None:
        """Clear the ledger, the attempt counters and the rate-limit window (in-flight requests stay)."""
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.billed: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.per_node: Counter[str] = Counter()
        self.answered_timestamps: list[float] = []
        self.max_in_flight = self.in_flight
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.window: deque[tuple[float, int]] = deque()  # (monotonic time, tokens) of billed answers
        self.window_tokens = 0
        self.idempotent: dict[str, dict] = {}  # Idempotency-Key -> the answer billed for it
        self.reasoning_tokens = 0
        self.cached_tokens = 0
        self.prompt_cache: set[str] = set()  # prompt_key of the first message of each prompt processed
        self.last_request_keys: list[str] | None = None
        self.last_request_headers: dict[str, str] | None = None
        for batch in self.batches.values():
            if batch.task is not None:
                batch.task.cancel()
        self.batches = {}
        self.batches_created = 0
        self.batch_lines_billed = 0

    def app(self) -> web.Application:
        # Room for a batch input file over the default batch_max_bytes, so that its validation can refuse it.
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat_completions)
        for prefix, route in (("/v1", self._openai_route), ("/openai", self._azure_route)):
            app.router.add_post(f"{prefix}/files", route(self.create_file))
            app.router.add_get(f"{prefix}/files", route(self.list_files))
            app.router.add_get(f"{prefix}/files/{{file_id}}", route(self.retrieve_file))
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", route(self.file_content))
            app.router.add_post(f"{prefix}/batches", route(self.create_batch))
            app.router.add_get(f"{prefix}/batches", route(self.list_batches))
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", route(self.retrieve_batch))
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", route(self.cancel_batch))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        app.router.add_post("/config", self.update_config)
        return app

    # Plain endpoints.

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pid": os.getpid()})

    async def stats(self, request: web.Request) -> web.Response:
        """The ledger since the last reset.

        ``answered``/``billed_per_prompt`` count 200s with a complete, valid body that reached the client
        (keys: ``prompt_key(messages)``), batch lines included; ``by_kind`` counts what happened to each chat
        request and batch line: a fault's name, "ok" (billed), "rate_limited", "abandoned" (the client left
        before the answer, so not billed), "unauthorized", "bad_request", "unsupported_parameter"; and "azure"
        for each chat request on Azure's route. ``by_status`` counts the statuses of chat (and models)
        responses, not of file and batch calls. ``answered_timestamps`` are ``time.monotonic()`` of each billed
        live answer (system-wide on Linux, so comparable with the client's clock); ``now`` is the server's
        monotonic clock. ``prompt_tokens``, ``completion_tokens`` (reasoning included), ``reasoning_tokens`` and
        ``cached_tokens`` total the billed usage. ``last_request_keys`` are the sorted body keys of the last
        chat request, ``last_request_headers`` its ``X-*``, ``api-key`` (value masked: "***") and
        ``OpenAI-Organization`` headers, names lower-cased (both None before any chat request).
        ``batches_created``, ``batch_lines_billed`` and ``batches`` ({id, status, total, completed, failed}
        of each batch since the reset, in creation order) describe the Batch API.
        """
        return web.json_response({
            "requests": self.requests,
            "answered": sum(self.billed.values()),
            "by_status": dict(self.by_status),
            "by_kind": dict(self.by_kind),
            "billed_per_prompt": dict(self.billed),
            "attempts_per_prompt": dict(self.attempts),
            "answered_timestamps": self.answered_timestamps,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "last_request_keys": self.last_request_keys,
            "last_request_headers": self.last_request_headers,
            "batches_created": self.batches_created,
            "batch_lines_billed": self.batch_lines_billed,
            "batches": [{"id": batch.info["id"], "status": batch.info["status"], **batch.info["request_counts"]}
                        for batch in self.batches.values()],
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "requests_per_node": dict(self.per_node),
            "now": time.monotonic(),
        })

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def update_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            config = FakeTeacherConfig(**{**dataclasses.asdict(self.config), **changes})
            answer_fn = load_answer_fn(config.answer_fn) if "answer_fn" in changes else self.answer_fn
        except (ValueError, TypeError) as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        self.config, self.answer_fn = config, answer_fn
        return web.json_response(dataclasses.asdict(config))

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "unauthorized")
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "fake-teacher"}
        return self._json(200, {"object": "list", "data": [model]})

    # Chat completions.

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted_chat(request)

    async def azure_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Azure's route: the deployment in the path is the model; ``api-version`` is required."""
        if "api-version" not in request.query:
            return self._json(404, azure_body(404, AZURE_NOT_FOUND))
        self.by_kind["azure"] += 1
        return await self._counted_chat(request, request.match_info["deployment"])

    async def _counted_chat(self, request: web.Request, deployment: str | None = None) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        node = request.headers.get("X-Node")
        if node is not None:
            self.per_node[node] += 1
        try:
            return await self._chat(request, deployment)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: web.Request, deployment: str | None) -> web.StreamResponse:
        config = self.config
        self._record_headers(request)
        if not self._authorized(request, azure=deployment is not None):
            if deployment is not None:
                self.by_kind["unauthorized"] += 1
                return self._json(401, azure_body(401, AZURE_UNAUTHORIZED))
            return self._error(401, "unauthorized")
        try:
            body = await request.json()
            if isinstance(body, dict):
                self.last_request_keys = sorted(body)
            messages, model = chat_request(body, deployment)
        except (ValueError, KeyError, TypeError) as exc:
            self.by_kind["bad_request"] += 1
            return self._json(400, error_body(f"Invalid request body: {exc!r}", "invalid_request_error"))
        unsupported = self._unsupported(body)
        if unsupported is not None:
            return self._json(400, unsupported_body(unsupported))

        key = prompt_key(messages)
        idempotency_key = request.headers.get("Idempotency-Key")
        if config.honour_idempotency_key and idempotency_key in self.idempotent:
            self.by_kind["idempotent_replay"] += 1
            return self._json(200, self.idempotent[idempotency_key])
        attempt = self.attempts[key]
        self.attempts[key] += 1
        text = last_user_text(messages)
        fault = self._fault(key, text, attempt)
        if fault != "ok":  # "ok" is counted once billed (or as rate_limited / abandoned)
            self.by_kind[fault] += 1
        if fault == "429":  # rate limits answer at once, as real ones do
            return self._rate_limited(config.retry_after_s, "Rate limit reached (scripted fault).")
        if fault == "timeout":
            await asyncio.sleep(config.timeout_fault_s)
            if gone(request):
                self.by_kind["abandoned"] += 1
                return web.Response(status=499)
        elif fault != "ok":
            await asyncio.sleep(config.latency_s)
            if fault == "reset":
                return reset_connection(request)
            if fault in ERROR_FAULTS:
                return self._error(ERROR_FAULTS[fault], fault)

        completion = self._completion(body, model, messages, text)
        if fault in BODY_FAULTS:
            if fault == "empty_choices":
                payload = json.dumps({**completion, "choices": []}).encode()
            elif fault == "truncated":
                full = json.dumps(completion).encode()
                payload = full[: len(full) // 2]
            else:
                payload = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            # Content-Type says JSON so that a client has to parse it and notice.
            return self._raw(200, payload)

        usage = completion["usage"]
        tokens = usage["total_tokens"]
        wait_s = self._admit(tokens)
        if wait_s is not None:
            self.by_kind["rate_limited"] += 1
            return self._rate_limited(wait_s, f"Rate limit reached: rpm={config.rpm}, tpm={config.tpm}.")
        billed = False
        try:
            if fault != "timeout":  # a timeout fault already stalled in place of the latency
                await asyncio.sleep(config.latency_s)
            if gone(request):
                self.by_kind["abandoned"] += 1
                if config.bill_abandoned:
                    billed = True
                    self._bill(key, usage, completion, idempotency_key)
                return web.Response(status=499)
            response = web.Response(body=json.dumps(completion).encode(), content_type="application/json")
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:  # the client left while we wrote: it did not get the answer
                self.by_kind["abandoned"] += 1
                if config.bill_abandoned:
                    billed = True
                    self._bill(key, usage, completion, idempotency_key)
                return response
            billed = True
        finally:
            self._release(tokens, billed)
        self.by_status["200"] += 1
        if fault == "ok":
            self.by_kind["ok"] += 1
        self._bill(key, usage, completion, idempotency_key)
        return response

    def _bill(self, key: str, usage: dict, completion: dict, idempotency_key: str | None) -> None:
        self._bill_usage(key, usage)
        self.answered_timestamps.append(time.monotonic())
        if idempotency_key:
            self.idempotent[idempotency_key] = completion

    def _bill_usage(self, key: str, usage: dict) -> None:
        self.billed[key] += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.reasoning_tokens += usage["completion_tokens_details"]["reasoning_tokens"]
        self.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]

    def _unsupported(self, body: dict) -> str | None:
        """The first body key the model rejects (counted in ``by_kind``), or None."""
        for name in self.config.unsupported_params:
            if name in body:
                self.by_kind["unsupported_parameter"] += 1
                return name
        return None

    def _record_headers(self, request: web.Request) -> None:
        headers = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower.startswith("x-") or lower in ("api-key", "openai-organization"):
                headers[lower] = "***" if lower == "api-key" else value
        self.last_request_headers = headers

    def _fault(self, key: str, text: str, attempt: int) -> str:
        faults = self.config.faults
        for pattern, kinds in faults.items():
            if pattern != "*" and pattern in text:
                return kinds[attempt] if attempt < len(kinds) else "ok"
        if "*" in faults and attempt < len(faults["*"]):
            return faults["*"][attempt]
        if self.config.fault_rate > 0:
            rng = random.Random(f"{self.config.seed}:{key}:{attempt}")
            if rng.random() < self.config.fault_rate:
                return rng.choice(self.config.fault_kinds)
        return "ok"

    def _completion(self, body: dict, model: str, messages: list, text: str) -> dict:
        content = str(self.answer_fn(text))
        tokens = tokenize(content)
        finish_reason = "stop"
        reasoning = self.config.reasoning_tokens
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            reasoning = min(reasoning, limit)  # the limit covers the hidden reasoning, which comes first
            if limit - reasoning < len(tokens):
                tokens, finish_reason = tokens[:limit - reasoning], "length"
                content = "".join(tokens)
        prompt_tokens = sum(len(tokenize(text_of(m.get("content")))) + 1 for m in messages)
        prefix = prompt_key(messages[:1])
        cached = min(prompt_tokens, self.config.cached_prompt_tokens) if prefix in self.prompt_cache else 0
        self.prompt_cache.add(prefix)
        logprobs = None
        if body.get("logprobs"):
            low = any(p == "*" or p in text for p in self.config.low_confidence)
            chosen = self.config.low_confidence_logprob if low else self.config.token_logprob
            top_k = int(body.get("top_logprobs") or 0)
            logprobs = {"content": [token_logprobs(token, chosen, top_k) for token in tokens], "refusal": None}
        self.completions += 1
        return {
            "id": f"chatcmpl-fake{self.completions:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake_teacher",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens) + reasoning,
                "total_tokens": prompt_tokens + len(tokens) + reasoning,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            },
        }


    # Responses.

    def _authorized(self, request: web.Request, azure: bool = False) -> bool:
        """``Authorization: Bearer <api_key>``; on Azure's routes, ``api-key: <api_key>`` too."""
        key = self.config.api_key
        if key is None or request.headers.get("Authorization") == f"Bearer {key}":
            return True
        return azure and request.headers.get("api-key") == key

    def _raw(self, status: int, payload: bytes, headers: dict | None = None) -> web.Response:
        self.by_status[str(status)] += 1
        return web.Response(status=status, body=payload, content_type="application/json", headers=headers)

    def _json(self, status: int, body: dict, headers: dict | None = None) -> web.Response:
        return self._raw(status, json.dumps(body).encode(), headers)

    def _error(self, status: int, kind: str) -> web.Response:
        if kind == "unauthorized":
            self.by_kind[kind] += 1
        message, type_, code = ERRORS[status]
        return self._json(status, error_body(message, type_, code))

    def _rate_limited(self, wait_s: float, message: str) -> web.Response:
        retry_after = max(1, math.ceil(wait_s))
        body = error_body(f"{message} Please try again in {retry_after}s.", "requests", "rate_limit_exceeded")
        return self._json(429, body, {"Retry-After": str(retry_after)})
