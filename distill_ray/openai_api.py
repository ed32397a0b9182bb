"""The OpenAI chat-completions wire format, as distill-ray's two servers speak it.

One definition for the serve app (`serve/`) and the offline teacher (`teacher/offline.py`): the
error body (`RequestError`), the messages of a chat request (roles; content as a string or a list
of parts, whose text parts are joined and any other part is refused with a 400), the checks of the
common sampling parameters, and the framing of a streamed answer as server-sent events
(`chat.completion.chunk` events, then `data: [DONE]`). What each server accepts beyond that (the
student's limits, the teacher's logprobs) stays with the server.
"""

from __future__ import annotations

import json
import time
from typing import Any

# A request's roles and what each becomes: "developer" is the newer name of "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class RequestError(Exception):
    """A request answered with an OpenAI-style error: the HTTP status and the body OpenAI sends."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The body of an OpenAI error answer."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (iterative: a deep body cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The request's `messages` as [{role, content}] with string content.

    Raises:
        RequestError: 400 naming the message (and part) at fault: not a list, an unknown role,
            content that is neither a string nor a list of parts, a part that is not text
            (code `unsupported_content`).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be system, developer, user or assistant, not {role!r}",
                               param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text parts, joined
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(400, f"messages[{i}].content[{j}] is of type {kind!r}: this server reads text "
                                       "parts only", param=f"messages[{i}].content[{j}]", code="unsupported_content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts, not "
                               f"{type(content).__name__}", param=f"messages[{i}].content")
        clean.append({"role": ROLES[role], "content": content})
    return clean


def number(body: dict[str, Any], name: str, default: Any, kind: type, low: float, high: float,
           limit_key: str = "") -> Any:
    """The numeric parameter `name` (an int, or for `kind` float any number), within low..high;
    `default` when absent. `limit_key` names the setting behind the bounds in the message."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}, not {value!r}",
                           param=name)
    if not low <= value <= high:
        where = f" ({limit_key})" if limit_key else ""
        raise RequestError(400, f"'{name}' must be within {low:g}..{high:g}{where}, not {value!r}", param=name)
    return kind(value)


def parse_stop(body: dict[str, Any]) -> list[str]:
    """`stop`: a string or a list of at most 4 strings, as a list."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    return stop


def check_types(body: dict[str, Any], types: dict[str, tuple[type, str]]) -> None:
    """Each present key of `types` ({key: (type, 'a boolean')}) is of its type."""
    for key, (kind, what) in types.items():
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise RequestError(400, f"'{key}' must be {what}, not {body[key]!r}", param=key)


def check_n(body: dict[str, Any]) -> None:
    """One answer per request."""
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, f"only n=1 is supported, not n={body['n']!r}", param="n")


def completion_body(completion_id: str, model: str, text: str, usage: dict[str, int], finish: str = "stop",
                    logprobs: dict[str, Any] | None = None, created: int | None = None) -> dict[str, Any]:
    """A whole `chat.completion`."""
    return {"id": completion_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": logprobs}],
            "usage": usage}


def sse_event(completion_id: str, model: str, created: int, delta: dict[str, Any] | None,
              finish_reason: str | None = None, logprobs: dict[str, Any] | None = None, **extra: Any) -> bytes:
    """One `chat.completion.chunk` as a server-sent event; `delta` None: a chunk without choices
    (the usage chunk of `stream_options.include_usage`, passed in `extra`)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": logprobs}]
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices, **extra}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def sse_chunks(completion_id: str, model: str, text: str, finish: str = "stop"):
    """A whole answer as a stream: role, its words (each with its leading whitespace, as tokens
    stream), the finish, then [DONE]."""
    created = int(time.time())
    yield sse_event(completion_id, model, created, {"role": "assistant", "content": ""})
    pieces, word = [], ""
    for ch in text:
        if ch.isspace() and word.strip():
            pieces.append(word)
            word = ""
        word += ch
    if word:
        pieces.append(word)
    for piece in pieces:
        yield sse_event(completion_id, model, created, {"content": piece})
    yield sse_event(completion_id, model, created, {}, finish)
    yield SSE_DONE


def parse_sse(raw: bytes) -> list[dict[str, Any] | str]:
    """The events of an SSE body: each chunk's JSON, and "[DONE]" (for clients and tests)."""
    events: list[dict[str, Any] | str] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
