"""An async client for one OpenAI-compatible teacher: leases, retries, and answers captured whole.

Retried, with jittered exponential backoff that honours Retry-After: 429 (which also slows the
shared limiter), 408, 409, 5xx, timeouts, connection resets, and 200s whose body is malformed or
truncated. When retries run out the answer carries its `error`. Refused at once: 401/403 (the key)
and 404 (the URL or model) raise `TeacherRejected`, which stops the job; 400/413/422 fail that row
without retrying (the same request would fail again).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from distill_ray.config.schema import Teacher
from distill_ray.teacher.errors import TeacherRejected

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}
MAX_BACKOFF_S = 60.0


@dataclass
class Answer:
    """One teacher answer (or the error that ended its attempts)."""

    completion: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[dict[str, Any]]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    attempts: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    error_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


class _RowError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """A cheap upper-side estimate of prompt tokens (about 4 characters a token, plus framing)."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages) + 3


def cost_usd(teacher: Teacher, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * teacher.price_per_1m_input_tokens + completion_tokens * teacher.price_per_1m_output_tokens) / 1e6


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def parse_body(raw: bytes) -> dict[str, Any]:
    """Pull the answer out of a chat.completion body; malformed or truncated bodies are retryable."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
        raise _Retryable("malformed", f"malformed or truncated response body ({type(exc).__name__})") from exc
    if not isinstance(content, str):
        raise _Retryable("malformed", "response has no text content")
    tokens, logprobs, tops = [], [], []
    for item in ((choice.get("logprobs") or {}).get("content") or []):
        tokens.append(item.get("token", ""))
        logprobs.append(float(item.get("logprob", 0.0)))
        tops.append([{"token": t.get("token", ""), "logprob": float(t.get("logprob", 0.0))}
                     for t in item.get("top_logprobs") or []])
    usage = body.get("usage") or {}
    return {"completion": content, "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": choice.get("finish_reason")}


class TeacherClient:
    """Sends chat requests to one teacher through its cluster-wide limiter (a `LeaseClient`)."""

    def __init__(self, teacher: Teacher, api_key: str | None, limiter: Any | None, session: aiohttp.ClientSession,
                 rng: random.Random | None = None):
        self.teacher = teacher
        self.limiter = limiter
        self.session = session
        self.rng = rng or random.Random()
        self.url = f"{teacher.base_url}/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request_body(self, messages: list[dict[str, str]], sample: int) -> dict[str, Any]:
        t = self.teacher
        body: dict[str, Any] = {"model": t.model, "messages": messages, "temperature": t.temperature,
                                "max_tokens": t.max_tokens}
        if t.logprobs:
            body["logprobs"] = True
            if t.top_logprobs:
                body["top_logprobs"] = t.top_logprobs
        if t.samples > 1:
            body["seed"] = sample  # distinct samples of one prompt
        return body

    async def complete(self, messages: list[dict[str, str]], sample: int = 0, idempotency_key: str | None = None) -> Answer:
        """Ask until answered, a row error, or retries run out; never raises but for TeacherRejected."""
        t = self.teacher
        body = json.dumps(self.request_body(messages, sample))
        headers = dict(self.headers)
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key  # honoured by APIs that support it
        est_tokens = estimate_tokens(messages) + t.max_tokens
        est_cost = cost_usd(t, estimate_tokens(messages), t.max_tokens)
        answer = Answer()
        start = time.monotonic()
        for attempt in range(1, t.max_retries + 2):
            answer.attempts = attempt
            if self.limiter is not None and not await self.limiter.acquire(est_tokens, est_cost):
                answer.error, answer.error_kind = "budget_usd reached: not sent", "budget"
                return answer
            used, cost, delay = 0, 0.0, None
            try:
                parsed = await self._send(body, headers)
                prompt_tokens = parsed["prompt_tokens"] or estimate_tokens(messages)
                completion_tokens = parsed["completion_tokens"] or max(1, len(parsed["completion"]) // 4)
                used, cost = prompt_tokens + completion_tokens, cost_usd(t, prompt_tokens, completion_tokens)
                answer = Answer(**{**parsed, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                                attempts=attempt, cost_usd=cost, latency_s=time.monotonic() - start)
                return answer
            except _Retryable as exc:
                answer.error, answer.error_kind = str(exc), exc.kind
                backoff = min(MAX_BACKOFF_S, t.retry_backoff_s * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
                delay = max(backoff, exc.retry_after or 0.0)
                if exc.kind == "429" and self.limiter is not None:
                    self.limiter.throttle(exc.retry_after if exc.retry_after is not None else backoff)
            except _RowError as exc:
                answer.error, answer.error_kind = str(exc), exc.kind
                return answer
            finally:
                if self.limiter is not None:
                    self.limiter.settle(est_tokens, used or est_tokens, est_cost, cost, answered=used > 0)
            if attempt <= t.max_retries:
                await asyncio.sleep(delay)
        answer.latency_s = time.monotonic() - start
        answer.error = f"gave up after {answer.attempts} attempts: {answer.error}"
        return answer

    async def _send(self, body: str, headers: dict[str, str]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.teacher.timeout_s)
        try:
            async with self.session.post(self.url, data=body, headers=headers, timeout=timeout) as response:
                raw = await response.read()
                status = response.status
                if status == 200:
                    return parse_body(raw)
                message = _error_message(raw)
                if status in FATAL_STATUS:
                    what = "the API key" if status in (401, 403) else "the base_url or model"
                    raise TeacherRejected(
                        f"teacher '{self.teacher.name}' refused the request with HTTP {status} ({message}): check "
                        f"{what} (teachers[].{'api_key_env' if status in (401, 403) else 'base_url / model'})"
                    )
                if status in RETRYABLE_STATUS or status >= 500:
                    raise _Retryable(str(status), f"HTTP {status}: {message}", _retry_after(response.headers))
                raise _RowError(str(status), f"HTTP {status}: {message}")
        except TimeoutError as exc:
            raise _Retryable("timeout", f"no answer within {self.teacher.timeout_s}s") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientConnectionError) as exc:
            raise _Retryable("connection", f"connection error: {type(exc).__name__}") from exc


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:200]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace").strip() or "no body"
