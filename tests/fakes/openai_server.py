"""A scripted fake teacher: a real HTTP server on 127.0.0.1 speaking OpenAI's chat-completions wire format.

It answers deterministically (by default the ``ORD-123456`` order number in the last user message, or
``NONE``), and can be told to be slow, rate-limited (a global requests- and tokens-per-minute window that
answers 429 with ``Retry-After``), to demand an API key, and to fail on a script: per prompt, a list of
faults for its successive attempts (5xx, 4xx, timeouts, malformed or truncated bodies, connection resets).
A ledger counts what the teacher *billed* (each 200 with a complete, valid body), per prompt, so tests can
check that a client never pays twice.

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
``POST /stats/reset`` and ``POST /config`` (merge new knob values into the running server).
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
            gets that answer again, free (``by_kind["idempotent_replay"]``).
        answer_fn: ``"module:function"`` mapping the last user message to the answer; None: order numbers.
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
    honour_idempotency_key: bool = True
    answer_fn: str | None = None

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


def _error_body(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


_ERRORS = {  # status -> (message, type, code), as the OpenAI API words them
    400: ("Invalid request (scripted fault).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict: the request could not be processed (scripted fault).", "invalid_request_error", None),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


class FakeTeacherServer:
    """The server's state and handlers, in one process (``FakeTeacher`` runs it in another)."""

    def __init__(self, config: FakeTeacherConfig, answer_fn: Callable[[str], str] | None = None):
        self.config = config
        self.answer_fn = answer_fn or _load_answer_fn(config.answer_fn)
        self.in_flight = 0
        self.pending = 0  # admitted by the rate limiter, not yet answered
        self.pending_tokens = 0
        self.completions = 0
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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
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
        (keys: ``prompt_key(messages)``); ``by_kind`` counts what happened to each chat request: a fault's
        name, "ok" (billed), "rate_limited", "abandoned" (the client left before the answer, so not billed),
        "unauthorized", "bad_request"; ``answered_timestamps`` are ``time.monotonic()`` of each billed answer
        (system-wide on Linux, so comparable with the client's clock); ``now`` is the server's monotonic clock.
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
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        node = request.headers.get("X-Node")
        if node is not None:
            self.per_node[node] += 1
        try:
            return await self._chat(request)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        if not self._authorized(request):
            return self._error(401, "unauthorized")
        try:
            body = await request.json()
            messages, model = body["messages"], str(body["model"])
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise ValueError("'messages' must be a non-empty list of objects")
        except (ValueError, KeyError, TypeError) as exc:
            self.by_kind["bad_request"] += 1
            return self._json(400, _error_body(f"Invalid request body: {exc!r}", "invalid_request_error"))

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
        self.billed[key] += 1
        self.answered_timestamps.append(time.monotonic())
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        if idempotency_key:
            self.idempotent[idempotency_key] = completion

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
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(tokens):
            tokens, finish_reason = tokens[:limit], "length"
            content = "".join(tokens)
        prompt_tokens = sum(len(tokenize(_text(m.get("content")))) + 1 for m in messages)
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
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
        }

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

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

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
