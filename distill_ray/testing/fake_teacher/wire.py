"""The fake teacher's OpenAI and Azure wire shapes: error bodies as each words them, a chat request's
messages, the logprobs of an answer token, and a connection dropped with a TCP RST."""

from __future__ import annotations

import functools
import math
import socket
import struct

from aiohttp import web

from distill_ray import openai_api


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return openai_api.error_body(message, type_, param=param, code=code)


def unsupported_body(param: str) -> dict:
    """OpenAI's 400 for a parameter a reasoning model does not take."""
    message = f"Unsupported parameter: '{param}' is not supported with this model."
    if param == "max_tokens":
        message += " Use 'max_completion_tokens' instead."
    return error_body(message, "invalid_request_error", "unsupported_parameter", param)


def azure_body(status: int, message: str) -> dict:
    # Azure's gateway answers routing and key errors in its own shape: the code is the status, as a string.
    return {"error": {"code": str(status), "message": message}}


AZURE_NOT_FOUND = "Resource not found"
AZURE_UNAUTHORIZED = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                       "a valid key for an active subscription and use a correct regional API endpoint for your "
                       "resource.")


ERRORS = {  # status -> (message, type, code), as the OpenAI API words them
    400: ("Invalid request (scripted fault).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict: the request could not be processed (scripted fault).", "invalid_request_error", None),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def chat_request(body, deployment: str | None = None) -> tuple[list, str]:
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




# Alternatives offered in top_logprobs, after a token's own variants.
_ALTERNATIVES = ("NONE", " NONE", "ORD", "-", "\n", ".", *(str(digit) for digit in range(10)),
                 *(f"<alt{i}>" for i in range(20)))


@functools.lru_cache(maxsize=8192)
def token_logprobs(token: str, chosen: float, top_k: int) -> dict:
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


def api_error(status: int, message: str, type_: str, code: str | None = None,
               param: str | None = None) -> web.Response:
    """An OpenAI-shaped error from the file and batch routes (not counted in ``by_status``)."""
    return web.json_response(error_body(message, type_, code, param), status=status)


def gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def reset_connection(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST (SO_LINGER 0), before any byte of a response."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=499)  # never sent: the connection is gone
