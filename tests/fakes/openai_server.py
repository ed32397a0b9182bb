"""A scripted fake teacher: a real HTTP server on 127.0.0.1 speaking OpenAI's chat-completions wire format.

It answers deterministically (by default the ``ORD-123456`` order number in the last user message, or
``NONE``), and can be told to be slow, rate-limited (a global requests- and tokens-per-minute window that
answers 429 with ``Retry-After``), to demand an API key, and to fail on a script: per prompt, a list of
faults for its successive attempts (5xx, 4xx, timeouts, malformed or truncated bodies, connection resets).
A ledger counts what the teacher *billed* (each 200 with a complete, valid body), per prompt, so tests can
check that a client never pays twice. Like most real providers it bills a repeated request again.

It also plays a reasoning model (parameters it rejects as OpenAI words it, reasoning tokens and a prompt cache
in ``usage``), Azure OpenAI's routes (``/openai/deployments/{deployment}/...?api-version=...`` with an
``api-key`` header), and OpenAI's Files + Batches API: a JSONL of chat requests is validated, answered line by
line over ``batch_latency_s`` (scripted faults apply per line), and written to an output and an error file;
its lines are billed in the same ledger when the batch completes.

It runs in its own process, so Ray workers and a client that gets SIGKILLed can all talk to it:

    with FakeTeacher(FakeTeacherConfig(latency_s=0.05, rpm=600, faults={"ORD-000001": ["500", "ok"]})) as teacher:
        client = openai.OpenAI(base_url=teacher.base_url, api_key="x")
        ...
        assert max(teacher.stats()["billed_per_prompt"].values()) == 1

    @pytest.fixture(scope="module")
    def teacher():
        with FakeTeacher(FakeTeacherConfig()) as running:
            yield running

By hand: ``python tests/fakes/openai_server.py --config '{"latency_s": 0.05}' --port 8000``.
Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /stats``,
``POST /stats/reset`` and ``POST /config`` (merge new knob values into the running server); Azure's
``POST /openai/deployments/{deployment}/chat/completions``; and, under both ``/v1`` and Azure's ``/openai``,
``POST /files`` (multipart ``file`` + ``purpose=batch``), ``GET /files``, ``GET /files/{id}``,
``GET /files/{id}/content``, ``POST /batches``, ``GET /batches``, ``GET /batches/{id}`` and
``POST /batches/{id}/cancel``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import random
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
WINDOW_S = 60.0  # the rate-limit window, as OpenAI's per-minute limits
ERROR_FAULTS = {"500": 500, "503": 503, "408": 408, "409": 409, "400": 400, "404": 404}
BODY_FAULTS = ("malformed", "truncated", "empty_choices")
FAULT_KINDS = ("429", *ERROR_FAULTS, "timeout", *BODY_FAULTS, "reset", "ok")
BATCH_ENDPOINT = "/v1/chat/completions"
AZURE_BATCH_ENDPOINTS = (BATCH_ENDPOINT, "/chat/completions")  # Azure's batch files name the path without /v1
BATCH_WINDOW_S = 24 * 3600  # completion_window "24h"; batches never expire in the fake

_ORDER_NUMBER = re.compile(r"ORD-\d{6}", re.IGNORECASE)
# Words and punctuation, each with the whitespace before it (as BPE tokens carry a leading space);
# the tokens of a text join back to exactly that text.
_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


def answer_order_number(text: str) -> str:
    """The default teacher: the first ``ORD-`` + 6 digits order number in ``text``, upper-cased, or ``NONE``."""
    match = _ORDER_NUMBER.search(text)
    return match.group(0).upper() if match else "NONE"


def tokenize(text: str) -> list[str]:
    """A deterministic stand-in tokenizer: words and punctuation marks, each with its leading whitespace."""
    return _TOKEN.findall(text)


def prompt_key(messages: list) -> str:
    """The ledger's key for a request: sha256 of its ``messages`` as compact JSON with sorted keys."""
    text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _text(content) -> str:
    # Content is a string or a list of parts ({"type": "text", "text": ...}); other parts carry no text.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def last_user_text(messages: list) -> str:
    """The text of the last ``user`` message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


@dataclass
class FakeTeacherConfig:
    """The fake teacher's behaviour. JSON-serialisable (``to_json``/``from_json``), so it crosses processes.

    Attributes:
        latency_s: Seconds each request waits before it is answered (faults included, 429s excepted).
        rpm: Global limit: at most this many billed answers in any sliding 60 s window; beyond it, 429.
        tpm: Global limit on prompt + completion tokens of billed answers in any sliding 60 s window.
        api_key: When set, requests need ``Authorization: Bearer <api_key>``, else 401.
        faults: Scripted faults: a substring of the last user message (or ``"*"`` for any prompt) mapped to
            the faults for that prompt's successive attempts (attempt n = the n-th request with the same
            ``messages``). A prompt uses the first key it contains, ``"*"`` last; past the list's end, "ok".
        fault_rate: Chance that an attempt with no scripted fault gets a random one from ``fault_kinds``,
            drawn deterministically from (seed, prompt, attempt).
        fault_kinds: The faults drawn at random.
        seed: Seed for the random faults.
        low_confidence: Substrings of the last user message (``"*"``: any) whose answers get
            ``low_confidence_logprob`` per token instead of ``token_logprob``.
        token_logprob: Log-probability of each answer token (must be <= 0).
        low_confidence_logprob: Log-probability of each token of a low-confidence answer.
        retry_after_s: ``Retry-After`` of a scripted "429" fault.
        timeout_fault_s: How long a "timeout" fault stalls before answering (longer than the client's timeout).
        model: The model id listed by ``GET /v1/models``; requests may name any model, echoed back.
        bill_abandoned: Bill an answer whose client left before receiving it, as real providers do
            (a client killed mid-request has paid for it).
        honour_idempotency_key: A request repeating the ``Idempotency-Key`` of an answer already billed
            gets that answer again, free (``by_kind["idempotent_replay"]``). Off by default: like most real
            providers, the teacher bills a repeated request again.
        answer_fn: ``"module:function"`` mapping the last user message to the answer; None: order numbers.
        unsupported_params: Body keys a reasoning model rejects (e.g. ``["max_tokens", "temperature"]``): a chat
            request (or batch line) naming one gets a 400 worded as OpenAI's, ``code`` "unsupported_parameter"
            (``by_kind["unsupported_parameter"]``), before any attempt is counted; never billed.
        reasoning_tokens: Hidden reasoning tokens of each answer: counted in ``usage.completion_tokens`` and in
            ``usage.completion_tokens_details.reasoning_tokens``. As OpenAI's ``max_completion_tokens``, the
            answer-length limit bounds reasoning and visible tokens together (the reasoning comes first).
        cached_prompt_tokens: A provider prompt cache: a request whose first message (e.g. the system prompt)
            was seen before reports ``usage.prompt_tokens_details.cached_tokens`` = min(prompt tokens, this).
        batch_max_requests: A batch whose input file has more request lines fails validation.
        batch_max_bytes: A batch whose input file is larger fails validation (OpenAI: 200 MB).
        batch_latency_s: Seconds from a batch's creation to its completion; its lines are answered evenly
            over the first 90 % of it, then it is "finalizing" until the end.
        batch_fail_all: While set, every new batch fails validation with code "batch_failed".
    """

    latency_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    api_key: str | None = None
    faults: dict[str, list[str]] = field(default_factory=dict)
    fault_rate: float = 0.0
    fault_kinds: list[str] = field(default_factory=lambda: ["429", "500", "503"])
    seed: int = 0
    low_confidence: list[str] = field(default_factory=list)
    token_logprob: float = -0.01
    low_confidence_logprob: float = -2.0
    retry_after_s: int = 1
    timeout_fault_s: float = 30.0
    model: str = "fake-teacher"
    bill_abandoned: bool = False
    honour_idempotency_key: bool = False
    answer_fn: str | None = None
    unsupported_params: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0
    cached_prompt_tokens: int = 0
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024**2
    batch_latency_s: float = 1.0
    batch_fail_all: bool = False

    def __post_init__(self):
        self.faults = {str(key): [str(kind) for kind in kinds] for key, kinds in self.faults.items()}
        self.fault_kinds = [str(kind) for kind in self.fault_kinds]
        for where, kinds in [*((f"faults[{key!r}]", kinds) for key, kinds in self.faults.items()),
                             ("fault_kinds", self.fault_kinds)]:
            for kind in kinds:
                if kind not in FAULT_KINDS:
                    raise ValueError(f"{where}: unknown fault {kind!r}; valid: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate: {self.fault_rate} is not between 0 and 1")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_kinds: empty, but fault_rate > 0 needs at least one fault to draw")
        for name in ("rpm", "tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1, or None for no limit")
        for name in ("token_logprob", "low_confidence_logprob"):
            if getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)} is a log-probability and must be <= 0")
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s: {self.retry_after_s} must be an integer >= 1")
        if not isinstance(self.unsupported_params, list) or not all(
                isinstance(name, str) and name for name in self.unsupported_params):
            raise ValueError(f"unsupported_params: {self.unsupported_params!r} must be a list of body keys, "
                             "e.g. ['max_tokens']")
        for name in ("reasoning_tokens", "cached_prompt_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an integer >= 0")
        for name in ("batch_max_requests", "batch_max_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an integer >= 1")
        if self.batch_latency_s < 0:
            raise ValueError(f"batch_latency_s: {self.batch_latency_s} must be >= 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FakeTeacherConfig:
        return cls(**json.loads(text))


def _load_answer_fn(path: str | None) -> Callable[[str], str]:
    if path is None:
        return answer_order_number
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"answer_fn: cannot import {path!r} (expected 'module:function')") from exc


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _unsupported_body(param: str) -> dict:
    """OpenAI's 400 for a parameter a reasoning model does not take."""
    message = f"Unsupported parameter: '{param}' is not supported with this model."
    if param == "max_tokens":
        message += " Use 'max_completion_tokens' instead."
    return _error_body(message, "invalid_request_error", "unsupported_parameter", param)


def _azure_body(status: int, message: str) -> dict:
    # Azure's gateway answers routing and key errors in its own shape: the code is the status, as a string.
    return {"error": {"code": str(status), "message": message}}


_AZURE_NOT_FOUND = "Resource not found"
_AZURE_UNAUTHORIZED = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                       "a valid key for an active subscription and use a correct regional API endpoint for your "
                       "resource.")


_ERRORS = {  # status -> (message, type, code), as the OpenAI API words them
    400: ("Invalid request (scripted fault).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict: the request could not be processed (scripted fault).", "invalid_request_error", None),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def _chat_request(body, deployment: str | None = None) -> tuple[list, str]:
    """The ``messages`` and model of a chat request body (Azure: the deployment is the model).

    Raises:
        ValueError, KeyError, TypeError: The body is not a chat request.
    """
    if not isinstance(body, dict):
        raise TypeError("the body must be a JSON object")
    messages = body["messages"]
    model = deployment if deployment is not None else str(body["model"])
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of objects")
    return messages, model


@dataclass
class _Batch:
    """One batch: its wire object (updated in place as it runs) and the lines it has answered so far."""

    info: dict
    started: float  # time.monotonic() at creation
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set by a cancel
    task: asyncio.Task | None = None
    output_lines: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    billable: list[tuple[str, dict]] = field(default_factory=list)  # (prompt key, usage) of each answered line


def _batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
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
        return [], [_batch_error("file_too_large", f"The input file is {len(content)} bytes; a batch reads "
                                 f"at most {max_bytes} bytes.")]
    numbered = [(number, raw) for number, raw in enumerate(content.splitlines(), 1) if raw.strip()]
    if not numbered:
        return [], [_batch_error("empty_file", "The input file has no request lines.")]
    if len(numbered) > max_requests:
        return [], [_batch_error("too_many_requests", f"The input file has {len(numbered)} requests; a batch "
                                 f"holds at most {max_requests}.")]
    lines, errors, custom_ids, first_model = [], [], set(), None
    for number, raw in numbered:
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(_batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
            continue
        missing = [name for name in ("custom_id", "method", "url", "body") if not isinstance(line, dict)
                   or name not in line]
        if missing:
            errors.append(_batch_error("missing_required_parameter", f"Missing required parameter: "
                                       f"'{missing[0]}'.", number, missing[0]))
        elif not isinstance(line["custom_id"], str):
            errors.append(_batch_error("invalid_custom_id", "The custom_id must be a string.", number, "custom_id"))
        elif line["custom_id"] in custom_ids:
            errors.append(_batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                       "another request. The custom_id parameter must be unique for each request "
                                       "in a batch.", number, "custom_id"))
        elif line["method"] != "POST":
            errors.append(_batch_error("invalid_method", f"The method {line['method']!r} is not supported; "
                                       "use 'POST'.", number, "method"))
        elif line["url"] != endpoint:
            errors.append(_batch_error("invalid_url", f"The URL {line['url']!r} of this request does not match "
                                       f"the batch endpoint {endpoint!r}.", number, "url"))
        elif not isinstance(line["body"], dict):
            errors.append(_batch_error("invalid_body", "The body must be a JSON object.", number, "body"))
        elif first_model is not None and line["body"].get("model", first_model) != first_model:
            errors.append(_batch_error("mismatched_model", f"The model {line['body']['model']!r} differs from "
                                       f"{first_model!r} of the lines before it; all lines of a batch must name "
                                       "the same model.", number, "body.model"))
        else:
            custom_ids.add(line["custom_id"])
            first_model = first_model if first_model is not None else line["body"].get("model")
            lines.append(line)
    return lines, errors


class FakeTeacherServer:
    """The server's state and handlers, in one process (``FakeTeacher`` runs it in another)."""

    def __init__(self, config: FakeTeacherConfig, answer_fn: Callable[[str], str] | None = None):
        self.config = config
        self.answer_fn = answer_fn or _load_answer_fn(config.answer_fn)
        self.in_flight = 0
        self.pending = 0  # admitted by the rate limiter, not yet answered
        self.pending_tokens = 0
        self.completions = 0
        self.files: dict[str, dict] = {}  # file id -> {"object": the file object, "content": bytes}
        self.batches: dict[str, _Batch] = {}  # in creation order
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
            answer_fn = _load_answer_fn(config.answer_fn) if "answer_fn" in changes else self.answer_fn
        except (ValueError, TypeError) as exc:
            return web.json_response(_error_body(str(exc), "invalid_request_error"), status=400)
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
            return self._json(404, _azure_body(404, _AZURE_NOT_FOUND))
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
                return self._json(401, _azure_body(401, _AZURE_UNAUTHORIZED))
            return self._error(401, "unauthorized")
        try:
            body = await request.json()
            if isinstance(body, dict):
                self.last_request_keys = sorted(body)
            messages, model = _chat_request(body, deployment)
        except (ValueError, KeyError, TypeError) as exc:
            self.by_kind["bad_request"] += 1
            return self._json(400, _error_body(f"Invalid request body: {exc!r}", "invalid_request_error"))
        unsupported = self._unsupported(body)
        if unsupported is not None:
            return self._json(400, _unsupported_body(unsupported))

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
            if _gone(request):
                self.by_kind["abandoned"] += 1
                return web.Response(status=499)
        elif fault != "ok":
            await asyncio.sleep(config.latency_s)
            if fault == "reset":
                return _reset(request)
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
            if _gone(request):
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
        prompt_tokens = sum(len(tokenize(_text(m.get("content")))) + 1 for m in messages)
        prefix = prompt_key(messages[:1])
        cached = min(prompt_tokens, self.config.cached_prompt_tokens) if prefix in self.prompt_cache else 0
        self.prompt_cache.add(prefix)
        logprobs = None
        if body.get("logprobs"):
            low = any(p == "*" or p in text for p in self.config.low_confidence)
            chosen = self.config.low_confidence_logprob if low else self.config.token_logprob
            top_k = int(body.get("top_logprobs") or 0)
            logprobs = {"content": [_token_logprobs(token, chosen, top_k) for token in tokens], "refusal": None}
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

    # Files and batches (OpenAI's Files + Batches API, and Azure's copy of it under /openai).

    def _openai_route(self, handler):
        async def route(request: web.Request) -> web.Response:
            if not self._authorized(request):
                return _api_error(401, *_ERRORS[401])
            return await handler(request)
        return route

    def _azure_route(self, handler):
        async def route(request: web.Request) -> web.Response:
            if "api-version" not in request.query:
                return web.json_response(_azure_body(404, _AZURE_NOT_FOUND), status=404)
            if not self._authorized(request, azure=True):
                return web.json_response(_azure_body(401, _AZURE_UNAUTHORIZED), status=401)
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
            return _api_error(400, "Missing required parameter: 'file'.", "invalid_request_error", param="file")
        if purpose != "batch":
            return _api_error(400, f"Invalid value for 'purpose': {purpose!r}. The fake teacher takes only "
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
        return _api_error(404, f"No such File object: {file_id}", "invalid_request_error", param="id")

    async def create_batch(self, request: web.Request) -> web.Response:
        endpoints = AZURE_BATCH_ENDPOINTS if request.path.startswith("/openai/") else (BATCH_ENDPOINT,)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
        except (ValueError, TypeError) as exc:
            return _api_error(400, f"Invalid request body: {exc!r}", "invalid_request_error")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                return _api_error(400, f"Missing required parameter: '{name}'.", "invalid_request_error",
                                  "missing_required_parameter", name)
        if body["endpoint"] not in endpoints:
            return _api_error(400, f"Invalid value for 'endpoint': {body['endpoint']!r}. The fake teacher batches "
                              f"only {' and '.join(endpoints)}.", "invalid_request_error", param="endpoint")
        if body["completion_window"] != "24h":
            return _api_error(400, f"Invalid value for 'completion_window': {body['completion_window']!r}. "
                              "Supported values are: '24h'.", "invalid_request_error", param="completion_window")
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            return _api_error(400, "Invalid type for 'metadata': expected an object.", "invalid_request_error",
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
        batch = _Batch(info=info, started=time.monotonic())
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
            return _api_error(400, f"Invalid 'limit': {request.query.get('limit')!r}; expected 1 to 100.",
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
            return _api_error(400, f"Cannot cancel a batch with status '{status}'.", "invalid_request_error")
        if status != "cancelling":
            batch.info.update(status="cancelling", cancelling_at=int(time.time()))
            batch.wake.set()
        return web.json_response(batch.info)

    def _no_batch(self, batch_id: str) -> web.Response:
        return _api_error(404, f"No batch found with id '{batch_id}'.", "invalid_request_error", param="batch_id")

    async def _run_batch(self, batch: _Batch, content: bytes) -> None:
        """Validate, answer the lines evenly over 90 % of ``batch_latency_s``, finalize, then complete."""
        config, info = self.config, batch.info
        if config.batch_fail_all:
            lines, errors = [], [_batch_error("batch_failed", "The batch failed (scripted: batch_fail_all).")]
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

    async def _nap(self, batch: _Batch, seconds: float) -> None:
        """Sleep, but wake up at once when the batch is cancelled."""
        if seconds > 0:
            try:
                await asyncio.wait_for(batch.wake.wait(), seconds)
            except TimeoutError:
                pass

    def _answer_batch_line(self, batch: _Batch, line: dict) -> None:
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
            messages, model = _chat_request(body)
        except (ValueError, KeyError, TypeError) as exc:
            self.by_kind["bad_request"] += 1
            return 400, _error_body(f"Invalid request body: {exc!r}", "invalid_request_error"), None
        unsupported = self._unsupported(body)
        if unsupported is not None:
            return 400, _unsupported_body(unsupported), None
        key = prompt_key(messages)
        attempt = self.attempts[key]
        self.attempts[key] += 1
        text = last_user_text(messages)
        fault = self._fault(key, text, attempt)
        if fault == "ok":
            return 200, self._completion(body, model, messages, text), key
        self.by_kind[fault] += 1
        if fault == "429":
            return 429, _error_body("Rate limit reached (scripted fault).", "requests", "rate_limit_exceeded"), None
        message, type_, code = _ERRORS[ERROR_FAULTS.get(fault, 500)]
        return ERROR_FAULTS.get(fault, 500), _error_body(message, type_, code), None

    def _finish_batch(self, batch: _Batch, status: str) -> None:
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

    # The rate limiter. Admitted requests hold a slot while pending, so concurrent requests cannot
    # overshoot the limit, and billed answers hold theirs for 60 s from the moment they were answered:
    # then no 60 s window of `answered_timestamps` ever holds more than `rpm` answers.

    def _admit(self, tokens: int) -> float | None:
        """Reserve a slot; None when admitted, else the seconds until enough of the window frees up."""
        now = time.monotonic()
        while self.window and self.window[0][0] <= now - WINDOW_S:
            self.window_tokens -= self.window.popleft()[1]
        rpm, tpm = self.config.rpm, self.config.tpm
        # Each occupant frees its slot 60 s after its answer; pending ones are guessed to answer after latency.
        pending_free_at = now + self.config.latency_s + WINDOW_S
        wait = 0.0
        if rpm is not None and len(self.window) + self.pending >= rpm:
            surplus = len(self.window) + self.pending - rpm  # the (surplus+1)-th occupant to leave frees a slot
            wait = self.window[surplus][0] + WINDOW_S - now if surplus < len(self.window) else pending_free_at - now
        excess = 0 if tpm is None else self.window_tokens + self.pending_tokens + tokens - tpm
        if excess > 0:
            wait_tokens = WINDOW_S if tokens > tpm else pending_free_at - now  # too large: never fits
            for at, used in self.window:
                excess -= used
                if excess <= 0:
                    wait_tokens = at + WINDOW_S - now
                    break
            wait = max(wait, wait_tokens)
        if wait > 0:
            return wait
        self.pending += 1
        self.pending_tokens += tokens
        return None

    def _release(self, tokens: int, billed: bool) -> None:
        self.pending -= 1
        self.pending_tokens -= tokens
        if billed:
            self.window.append((time.monotonic(), tokens))
            self.window_tokens += tokens

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
        message, type_, code = _ERRORS[status]
        return self._json(status, _error_body(message, type_, code))

    def _rate_limited(self, wait_s: float, message: str) -> web.Response:
        retry_after = max(1, math.ceil(wait_s))
        body = _error_body(f"{message} Please try again in {retry_after}s.", "requests", "rate_limit_exceeded")
        return self._json(429, body, {"Retry-After": str(retry_after)})


# Alternatives offered in top_logprobs, after a token's own variants.
_ALTERNATIVES = ("NONE", " NONE", "ORD", "-", "\n", ".", *(str(digit) for digit in range(10)),
                 *(f"<alt{i}>" for i in range(20)))


@functools.lru_cache(maxsize=8192)
def _token_logprobs(token: str, chosen: float, top_k: int) -> dict:
    """Logprobs of one answer token: the chosen token is the most likely, and the top-k alternatives
    share (geometrically) the probability mass it leaves, so the listed probabilities sum to at most 1.
    Cached (answers repeat), so callers must not mutate the result."""
    left = max(1.0 - math.exp(chosen), 1e-12)
    encoded = list(token.encode())
    top = [{"token": token, "logprob": chosen, "bytes": encoded}]
    seen = {token}
    for candidate in (token.swapcase(), token.strip() or "_", " " + token.strip(), *_ALTERNATIVES):
        if len(top) >= top_k:
            break
        if candidate not in seen:
            seen.add(candidate)
            rank = len(top)
            logprob = round(min(math.log(left * 0.5**rank), chosen - 0.25 * rank), 4)
            top.append({"token": candidate, "logprob": logprob, "bytes": list(candidate.encode())})
    return {"token": token, "logprob": chosen, "bytes": encoded, "top_logprobs": top[:top_k]}


def _api_error(status: int, message: str, type_: str, code: str | None = None,
               param: str | None = None) -> web.Response:
    """An OpenAI-shaped error from the file and batch routes (not counted in ``by_status``)."""
    return web.json_response(_error_body(message, type_, code, param), status=status)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST (SO_LINGER 0), before any byte of a response."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=499)  # never sent: the connection is gone


# Running it.


async def serve(config: FakeTeacherConfig, host: str = "127.0.0.1", port: int = 0,
                exit_with_parent: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or, with ``exit_with_parent``, until stdin closes). Prints the port first."""
    server = FakeTeacherServer(config)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(json.dumps({"port": bound, "base_url": f"http://{host}:{bound}/v1", "pid": os.getpid()}), flush=True)
    sys.stdout = sys.stderr  # the parent reads one line and may close the pipe; nothing else goes there

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if exit_with_parent:  # stdin is a pipe from the parent: EOF means the parent is gone
        class _ParentWatch(asyncio.Protocol):
            def connection_lost(self, exc):
                stop.set()

        await loop.connect_read_pipe(_ParentWatch, sys.stdin)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="FakeTeacherConfig as JSON, e.g. '{\"rpm\": 60}'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when stdin reaches EOF")
    args = parser.parse_args(argv)
    asyncio.run(serve(FakeTeacherConfig.from_json(args.config), args.host, args.port, args.exit_with_parent))


class FakeTeacher:
    """Runs the fake teacher in a subprocess for the length of a ``with`` block.

    Args:
        config: The behaviour knobs (default: a fast, well-behaved teacher).
        startup_timeout_s: How long to wait for the server to listen and answer ``/health``.

    Raises:
        RuntimeError: The server did not come up (its exit code and stderr say why).
    """

    def __init__(self, config: FakeTeacherConfig | None = None, startup_timeout_s: float = 30.0):
        self.config = config or FakeTeacherConfig()
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def start(self) -> FakeTeacher:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, str(Path(__file__).resolve()), "--config", self.config.to_json(),
                   "--port", "0", "--exit-with-parent"]
        # stderr goes to a file: read back if the server fails to start, and never a pipe that fills up.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            line = self._first_line(deadline)
            self.port = json.loads(line)["port"]
            while True:
                try:
                    if self._get("/health")["ok"]:
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except (OSError, ValueError, KeyError, TimeoutError) as exc:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"fake teacher did not start (exit code {self.process.returncode}): "
                               f"{exc!r}\n{self.log.read()}") from exc
        self.process.stdout.close()
        return self

    def _first_line(self, deadline: float) -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"no port line within {self.startup_timeout_s} s")
        line = self.process.stdout.readline()
        if not line:
            raise ValueError("the server exited before printing its port")
        return line

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop exactly this server: SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdin.close()
        if not self.process.stdout.closed:
            self.process.stdout.close()
        self.log.close()

    def __enter__(self) -> FakeTeacher:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _get(self, path: str, data: bytes | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        """The ledger: see ``GET /stats``."""
        return self._get("/stats")

    def reset(self) -> None:
        """Clear the ledger, attempt counters and rate-limit window."""
        self._get("/stats/reset", b"{}")

    def configure(self, **changes) -> FakeTeacherConfig:
        """Change knobs of the running server (e.g. ``rpm=60``); returns the new config."""
        self.config = FakeTeacherConfig(**{**dataclasses.asdict(self.config), **changes})  # validate here first
        return FakeTeacherConfig(**self._get("/config", json.dumps(changes).encode()))


if __name__ == "__main__":
    main()
