"""The serve app's requests: a chat completion body checked against what the student can do and
`serve:`'s limits, the body read within its size limit, and the bearer tokens checked. The wire
format itself (messages, content parts, errors) is `distill_ray.openai_api`'s."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

from distill_ray.openai_api import (
    RequestError,
    check_n,
    check_types,
    json_depth,
    number,
    parse_messages,
    parse_stop,
)

UNSUPPORTED = {  # request keys the student cannot honour: refused clearly rather than ignored
    "tools": "the student cannot call tools", "functions": "the student cannot call functions",
    "tool_choice": "the student cannot call tools", "function_call": "the student cannot call functions",
    "audio": "the student reads and writes text only", "modalities": "the student reads and writes text only",
    "prediction": "predicted outputs are not supported", "logit_bias": "logit_bias is not supported",
}
ORIGIN = re.compile(r"^[a-z0-9_:.-]{1,40}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def parse_chat_request(raw: bytes, max_bytes: int, max_tokens_cap: int = 1 << 30, max_depth: int = 64
                       ) -> dict[str, Any]:
    """Validate a /v1/chat/completions body; the body with its messages made plain {role, content}.

    Raises:
        RequestError: 400 (413 past `max_bytes`) naming what is wrong and the serve setting behind a limit.
    """
    if len(raw) > max_bytes:
        raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes} (serve.max_request_bytes)",
                           code="request_too_large")
    too_deep = RequestError(400, f"the body nests deeper than {max_depth} levels (serve.max_json_depth)",
                            code="too_deep")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if json_depth(body) > max_depth:
        raise too_deep
    messages = parse_messages(body)
    for key in ("max_tokens", "max_completion_tokens"):
        number(body, key, None, int, 1, max_tokens_cap, limit_key="serve.max_tokens")
    number(body, "temperature", None, float, 0, 2)
    check_n(body)
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}):
            raise RequestError(400, f"'{key}' is not supported: {why}", param=key, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError(400, "'response_format' other than {'type': 'text'} is not supported: the student was not "
                           "trained for structured output", param="response_format", code="unsupported_parameter")
    if body.get("logprobs") is True:
        raise RequestError(400, "'logprobs' is not supported by this endpoint", param="logprobs",
                           code="unsupported_parameter")
    parse_stop(body)
    check_types(body, {"user": (str, "a string"), "stream": (bool, "a boolean"), "metadata": (dict, "an object")})
    return {**body, "messages": messages}


async def read_body(request, limit: int) -> bytes:
    """The body, read as it arrives and refused (413) once past `limit` (serve.max_request_bytes),
    whether it declared its length or came chunked."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit} (serve.max_request_bytes)",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes (serve.max_request_bytes)",
                               code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def authorize(header: str | None, token_sha256: str | None, admin_sha256: str | None, admin: bool = False) -> bool:
    """API endpoints take the API token (or the admin's); control endpoints the admin token only.
    True when the caller holds the admin token (or the endpoint is open to all). The tokens are
    known here by their SHA-256 only."""
    if token_sha256 is None and admin_sha256 is None:
        return True  # serve.allow_open_endpoint
    token = header[7:] if header and header.lower().startswith("bearer ") else ""
    given = hashlib.sha256(token.encode()).hexdigest()
    is_admin = admin_sha256 is None or hmac.compare_digest(given, admin_sha256)
    is_client = token_sha256 is not None and hmac.compare_digest(given, token_sha256)
    if admin:
        if is_admin:
            return True
        if is_client:
            raise RequestError(403, "the API token may not control the app: the control endpoints take the admin "
                               "token (serve.admin_token_env)", type_="permission_error", code="admin_only")
    elif is_client or is_admin or token_sha256 is None:
        return is_admin
    raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <serve.auth_token_env>)",
                       type_="authentication_error", code="invalid_api_key")
