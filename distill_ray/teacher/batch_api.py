"""The provider's side of generate.mode batch: the official client for its Files and Batches endpoints
(OpenAI's or Azure's), requests cut into chunks within its limits, a batch's terminal states, a line's
error as the live client names it, and the client's errors turned into the step's (`ApiErrors`)."""

from __future__ import annotations

import os
from typing import Any

import openai

from distill_ray.config.schema import Teacher
from distill_ray.teacher.client import ROW_PARAMS
from distill_ray.teacher.errors import TeacherRejected

TERMINAL = ("completed", "failed", "expired", "cancelled")


def batch_client(teacher: Teacher) -> openai.OpenAI:
    """The official client for the teacher's Files and Batches endpoints (OpenAI's or Azure's)."""
    api_key = (os.environ.get(teacher.api_key_env) if teacher.api_key_env else None) or "EMPTY"
    common = {"api_key": api_key, "default_headers": teacher.extra_headers or None, "max_retries": 4,
              "timeout": max(600.0, teacher.timeout_s)}  # an upload of 200 MB takes a while
    if teacher.api == "azure":
        return openai.AzureOpenAI(azure_endpoint=teacher.base_url, api_version=teacher.api_version, **common)
    return openai.OpenAI(base_url=teacher.base_url, **common)


def batch_url(teacher: Teacher) -> str:
    """The endpoint a batch and each of its lines name: Azure's drops OpenAI's /v1."""
    return "/chat/completions" if teacher.api == "azure" else "/v1/chat/completions"


def plan_chunks(sizes: list[int], max_requests: int, max_bytes: int) -> tuple[list[list[int]], list[int]]:
    """Cut lines (their sizes in bytes, in order) into chunks of at most `max_requests` lines and
    `max_bytes` bytes; returns (the chunks as line indexes, the lines too large for any chunk)."""
    chunks: list[list[int]] = []
    too_large: list[int] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes):
        if size > max_bytes:
            too_large.append(index)
            continue
        if current and (len(current) >= max_requests or used + size > max_bytes):
            chunks.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        chunks.append(current)
    return chunks, too_large


def finished_at(batch: Any) -> int | None:
    return getattr(batch, f"{batch.status}_at", None)


def line_error(status: int | None, body: Any, error: Any) -> tuple[str, str]:
    """The row error of a line that was not answered: the API's message, and its kind as the live
    client names it (the status, or "request_shape" when a parameter other than the messages is refused)."""
    detail = body.get("error") if isinstance(body, dict) else None
    if status is None or not isinstance(detail, dict):
        # No response at all (e.g. a line the provider expired): the line's own error object.
        error = error if isinstance(error, dict) else {}
        code = error.get("code") or (str(status) if status else "batch_error")
        return f"{code}: {error.get('message') or body or 'no detail'}", str(code)
    message, param, code = str(detail.get("message"))[:500], detail.get("param"), detail.get("code")
    if param not in ROW_PARAMS or code in ("unsupported_parameter", "unsupported_value"):
        return f"HTTP {status}: {message}" + (f" (param: {param})" if param else ""), "request_shape"
    return f"HTTP {status}: {message}", str(status)


class Transient(Exception):
    """A Files/Batches call failed after the client's own retries, in a way that may pass."""


class ApiErrors:
    """Turns the openai client's errors into the step's: refusals into TeacherRejected (exit 2),
    connection trouble and 5xx/429 into Transient; the rest go on as they are."""

    def __init__(self, teacher: Teacher, what: str):
        self.teacher, self.what = teacher, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        name = f"teacher '{self.teacher.name}' ({self.teacher.base_url})"
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            raise TeacherRejected(f"{name} refused to {self.what} with HTTP {exc.status_code}: check the API key "
                                  f"(teachers[].api_key_env)") from exc
        if isinstance(exc, openai.NotFoundError) and self.what in ("upload the batch input file", "create the batch"):
            raise TeacherRejected(f"{name}: cannot {self.what} (HTTP 404): does it offer the Files and Batches "
                                  "API? Set generate.mode: online otherwise") from exc
        if isinstance(exc, openai.BadRequestError) and self.what == "create the batch":
            raise TeacherRejected(f"{name} refused to {self.what}: {exc.message} (generate.batch_completion_window, "
                                  "or the teacher's request options)") from exc
        if isinstance(exc, (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)):
            raise Transient(f"{type(exc).__name__}: {exc}") from exc
        return False
