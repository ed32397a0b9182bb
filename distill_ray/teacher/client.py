"""An async client for one OpenAI-compatible teacher: leases, retries, and answers captured whole.

Retried, with jittered exponential backoff that honours Retry-After: 429 (which also slows the
shared ledger), 408, 409, 5xx, timeouts, connection resets, and 200s whose body is malformed or
truncated. When retries run out the answer carries its `error`. Refused at once: 401/403 (the key)
and 404 (the URL or model) raise `TeacherRejected`, which stops the job; 400/413/422 fail that row
without retrying (the same request would fail again). A 400 that names a request parameter (a
reasoning model refusing `max_tokens`, say) is `error_kind` "request_shape": the step's preflight
request turns it into exit 2, quoting the API, before any fan-out.

The request is what the teacher's config says: OpenAI's or Azure OpenAI's URL and key header,
`max_tokens` or `max_completion_tokens`, `reasoning_effort`, `response_format`, `extra_body`,
`extra_headers`, logprobs or not. Usage keeps cached prompt tokens and reasoning tokens, and the
cost prices each (reasoning tokens are output tokens, as providers bill them).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
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
    cached_tokens: int = 0  # of prompt_tokens, served from the provider's prompt cache
    reasoning_tokens: int = 0  # of completion_tokens, spent thinking (not in the text)
    finish_reason: str | None = None
    latency_s: float = 0.0
    attempts: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    error_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Shallow (dataclasses.asdict deep-copies every logprob list: a tenth of a worker's CPU at high fan-out).
        return {name: getattr(self, name) for name in ANSWER_FIELD_NAMES}


ANSWER_FIELD_NAMES = tuple(f.name for f in fields(Answer))


class RetryableError(Exception):
    """A failed attempt worth another (a 429, a 5xx, a malformed or cut body); `kind` names it."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


class _RowError(Exception):
    def __init__(self, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind, self.param = kind, param


_SPLICE = "\u0000distill-ray:messages\u0000"  # stands for the messages in a request body template
# Parameters a 400 may name that are about the row, not the request's shape.
ROW_PARAMS = {None, "", "messages", "prompt", "input"}


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """A cheap upper-side estimate of prompt tokens (about 4 characters a token, plus framing)."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages) + 3


def cost_usd(teacher: Teacher, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
             batch: bool = False) -> float:
    """Dollars for one answer: uncached and cached prompt tokens, and completion tokens (reasoning
    tokens included), at the online or the batch price."""
    cached = min(cached_tokens, prompt_tokens)
    cached_price = teacher.price_per_1m_cached_input_tokens
    if cached_price is None:
        cached_price = teacher.price_per_1m_input_tokens
    dollars = ((prompt_tokens - cached) * teacher.price_per_1m_input_tokens + cached * cached_price
               + completion_tokens * teacher.price_per_1m_output_tokens) / 1e6
    return dollars * (teacher.batch_price_factor if batch else 1.0)


def chat_url(teacher: Teacher) -> str:
    """Where chat requests go: OpenAI's path, or Azure OpenAI's deployment path with its api-version."""
    if teacher.api == "azure":
        return f"{teacher.base_url}/openai/deployments/{teacher.model}/chat/completions?api-version={teacher.api_version}"
    return f"{teacher.base_url}/chat/completions"


def auth_headers(teacher: Teacher, api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **teacher.extra_headers}
    if api_key:
        if teacher.api == "azure":
            headers["api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    return headers


def request_body(teacher: Teacher, messages: list[dict[str, str]], sample: int = 0) -> dict[str, Any]:
    """The chat.completions request body the teacher's config asks for."""
    t = teacher
    body: dict[str, Any] = {"model": t.model, "messages": messages, t.token_limit_param: t.max_tokens}
    if t.temperature is not None:
        body["temperature"] = t.temperature
    if t.logprobs:
        body["logprobs"] = True
        if t.top_logprobs:
            body["top_logprobs"] = t.top_logprobs
    if t.samples > 1:
        body["seed"] = sample  # distinct samples of one prompt
    if t.reasoning_effort is not None:
        body["reasoning_effort"] = t.reasoning_effort
    if t.response_format is not None:
        body["response_format"] = t.response_format
    body.update(t.extra_body)
    return body


def usage_of(usage: dict[str, Any]) -> dict[str, int | None]:
    """Token counts of an OpenAI usage object (cached and reasoning tokens as 0 when not reported)."""
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            "reasoning_tokens": int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)}


def retry_after(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a `Retry-After` header asks to wait: a number of seconds or an HTTP date (None: absent or
    unreadable; 0 for a date already past)."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now())
        except (TypeError, ValueError):
            return None


def backoff_s(attempt: int, base_s: float, rng: random.Random) -> float:
    """The jittered exponential backoff after failed attempt `attempt` (1-based): `base_s` doubled per
    attempt, capped at MAX_BACKOFF_S, times a random factor in [0.5, 1] (clients spread out)."""
    return min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Pull the answer out of a chat.completion body; malformed or truncated bodies are retryable."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
        raise RetryableError("malformed", f"malformed or truncated response body ({type(exc).__name__})") from exc
    if not isinstance(content, str):
        raise RetryableError("malformed", "response has no text content")
    tokens, logprobs, tops = [], [], []
    for item in ((choice.get("logprobs") or {}).get("content") or []):
        tokens.append(item.get("token", ""))
        logprobs.append(float(item.get("logprob", 0.0)))
        tops.append([{"token": t.get("token", ""), "logprob": float(t.get("logprob", 0.0))}
                     for t in item.get("top_logprobs") or []])
    return {"completion": content, "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            **usage_of(body.get("usage") or {}), "finish_reason": choice.get("finish_reason")}


class TeacherClient:
    """Sends chat requests to one teacher through its ledger (a `LeaseClient`; None: no limits)."""

    def __init__(self, teacher: Teacher, api_key: str | None, limiter: Any | None, session: aiohttp.ClientSession,
                 rng: random.Random | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.teacher = teacher
        self.sleep = sleep  # between attempts (a test's fake sleep records the delays instead)
        self.limiter = limiter
        self.session = session
        self.rng = rng or random.Random()
        self.url = chat_url(teacher)
        self.headers = auth_headers(teacher, api_key)
        self.templates: dict[int, list[str]] = {}

    def _body(self, messages_json: str, sample: int) -> str:
        """The request body with `messages_json` spliced in as it is (no parse and re-encode per row)."""
        template = self.templates.get(sample)
        if template is None:
            template = self.templates[sample] = json.dumps(request_body(self.teacher, _SPLICE, sample)).split(
                json.dumps(_SPLICE), 1)
        return template[0] + messages_json + template[1]

    async def complete(self, messages: list[dict[str, str]] | None, sample: int = 0, idempotency_key: str | None = None,
                       messages_json: str | None = None) -> Answer:
        """Ask until answered, a row error, or retries run out; never raises but for TeacherRejected.

        `messages_json`, when given, is `messages` already encoded as JSON (the generate rows carry it)."""
        t = self.teacher
        if messages_json is not None:
            body = self._body(messages_json, sample)
            prompt_estimate = len(messages_json) // 4 + 3
        else:
            body = json.dumps(request_body(t, messages, sample))
            prompt_estimate = estimate_tokens(messages)
        headers = dict(self.headers)
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key  # honoured by APIs that support it
        est_tokens = prompt_estimate + t.max_tokens
        est_cost = cost_usd(t, prompt_estimate, t.max_tokens)
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
                prompt_tokens = parsed["prompt_tokens"] or prompt_estimate
                completion_tokens = parsed["completion_tokens"] or max(1, len(parsed["completion"]) // 4)
                used = prompt_tokens + completion_tokens
                cost = cost_usd(t, prompt_tokens, completion_tokens, parsed["cached_tokens"])
                answer = Answer(**{**parsed, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                                attempts=attempt, cost_usd=cost, latency_s=time.monotonic() - start)
                return answer
            except RetryableError as exc:
                answer.error, answer.error_kind = str(exc), exc.kind
                backoff = backoff_s(attempt, t.retry_backoff_s, self.rng)
                delay = max(backoff, exc.retry_after or 0.0)  # Retry-After honoured, even past the cap
                if exc.kind == "429" and self.limiter is not None:
                    self.limiter.throttle(exc.retry_after if exc.retry_after is not None else backoff)
            except _RowError as exc:
                answer.error, answer.error_kind = str(exc), exc.kind
                answer.latency_s = time.monotonic() - start
                return answer
            finally:
                if self.limiter is not None:
                    self.limiter.settle(est_tokens, used or est_tokens, est_cost, cost, answered=used > 0)
            if attempt <= t.max_retries:
                await self.sleep(delay)
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
                message, param, code = _error_detail(raw)
                if status in FATAL_STATUS:
                    what = "the API key" if status in (401, 403) else "the base_url or model"
                    raise TeacherRejected(
                        f"teacher '{self.teacher.name}' refused the request with HTTP {status} ({message}): check "
                        f"{what} (teachers[].{'api_key_env' if status in (401, 403) else 'base_url / model'})"
                    )
                if status in RETRYABLE_STATUS or status >= 500:
                    raise RetryableError(str(status), f"HTTP {status}: {message}", retry_after(response.headers))
                if param not in ROW_PARAMS or code in ("unsupported_parameter", "unsupported_value"):
                    raise _RowError("request_shape", f"HTTP {status}: {message}"
                                    + (f" (param: {param})" if param else ""), param)
                raise _RowError(str(status), f"HTTP {status}: {message}")
        except TimeoutError as exc:
            raise RetryableError("timeout", f"no answer within {self.teacher.timeout_s}s") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientConnectionError) as exc:
            raise RetryableError("connection", f"connection error: {type(exc).__name__}") from exc


def _error_detail(raw: bytes) -> tuple[str, str | None, str | None]:
    """The API's error message, and the `param` and `code` it names (OpenAI's error shape)."""
    try:
        error = json.loads(raw)["error"]
        return str(error["message"])[:500], error.get("param"), error.get("code")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace").strip() or "no body", None, None
