"""The offline teacher: an OpenAI-compatible chat server over a local model, batching concurrent requests.

It lets the whole pipeline run with no paid API: ``teachers[].base_url: http://127.0.0.1:8100/v1``.
It speaks the OpenAI wire format on ``POST /v1/chat/completions`` (greedy at temperature 0, sampling
with temperature/top_p/seed otherwise, stop strings, logprobs with top_logprobs, SSE streaming),
``GET /v1/models``, ``GET /health`` and ``GET /stats`` (requests served, batches run, batch sizes).

Concurrent requests are queued; one worker thread takes up to ``max_batch`` of them (waiting at most
``batch_wait_ms`` for more to arrive) and decodes them together, so the event loop never blocks on the
model. Prompts of a batch that start with the same chat history (the system line and few-shot turns of
a distillation task) share one key/value cache of that history, computed once and kept for the next
batches: only each request's own last message is prefilled.

    python -m distill_ray.teacher.offline --port 8100             # SmolLM2-135M-Instruct, offline
    distill-ray teacher serve --port 8100 --model path/or/s3://uri
    curl -s localhost:8100/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import uuid
from typing import Any

import torch
from aiohttp import web
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill_ray.engine.batcher import (
    DEFAULT_MAX_TOKENS,
    ENGINE,
    MAX_TOP_LOGPROBS,
    BatchGenerator,
    GenerationRequest,
    GenerationResult,
)
from distill_ray.openai_api import (
    SSE_DONE,
    SSE_HEADERS,
    RequestError,
    check_n,
    check_types,
    completion_body,
    error_body,
    number,
    parse_messages,
    parse_stop,
    sse_event,
)


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> web.Response:
    """An OpenAI-style error answer."""
    return web.json_response(error_body(message, type_, param, code), status=status)


def parse_chat_request(body: Any, tokenizer: PreTrainedTokenizerBase, max_context: int) -> tuple[
        GenerationRequest, bool, bool]:
    """Validate an OpenAI chat completion body and render its prompt.

    Args:
        body: the parsed JSON body.
        tokenizer: renders the chat template.
        max_context: the model's context length (prompt plus completion).

    Returns:
        (request, stream, include_usage_in_stream).

    Raises:
        RequestError: 400 with the message and the parameter the OpenAI API would name.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = parse_messages(body)
    check_n(body)
    stop = parse_stop(body)
    check_types(body, {"logprobs": (bool, "a boolean"), "stream": (bool, "a boolean"),
                       "stream_options": (dict, "an object")})
    top_logprobs = number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not body.get("logprobs"):
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    stream_options = body.get("stream_options") or {}
    prompt_ids, history_len = render_prompt(tokenizer, messages)
    room = max_context - len(prompt_ids)
    max_tokens = number(body, "max_completion_tokens", None, int, 1, 1 << 20)
    max_tokens = number(body, "max_tokens", max_tokens, int, 1, 1 << 20) if max_tokens is None else max_tokens
    if room < 1 or (max_tokens or 0) > room:
        raise RequestError(400, f"this model's context is {max_context} tokens; the prompt has {len(prompt_ids)} and "
                           f"{max_tokens or 1} more were asked for", param="messages", code="context_length_exceeded")
    request = GenerationRequest(
        prompt_ids=prompt_ids, max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, room),
        temperature=number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, float, 0.0, 1.0), seed=number(body, "seed", None, int, -(2**63), 2**64 - 1),
        stop=stop, top_logprobs=top_logprobs if body.get("logprobs") else 0, history_len=history_len)
    return request, bool(body.get("stream")), bool(stream_options.get("include_usage"))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """Prompt token ids of a chat, and how many of them are the history (every message but the last).

    The history length is 0 when the template does not render the history as a token prefix of the prompt.
    """
    def ids(msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        else:  # a bare tokenizer (tests, base models): a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + ("assistant: " if generation_prompt else "")
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(messages, True)
    history = ids(messages[:-1], False) if len(messages) > 1 else []
    return prompt, len(history) if prompt[: len(history)] == history and len(history) < len(prompt) else 0


class _TokenText:
    """The text and raw bytes of each token, as the OpenAI logprobs format wants them (memoised)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        # GPT-2's byte-to-unicode table, inverted: byte-level BPE tokens spell raw bytes with these characters
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        self.unicode_to_byte = {chr(c): c for c in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
        self._memo: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._memo:
            text = self.tokenizer.decode([token_id])
            raw = list(text.encode())
            if self.byte_level and token_id not in self.tokenizer.all_special_ids:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if all(ch in self.unicode_to_byte for ch in piece):
                    raw = [self.unicode_to_byte[ch] for ch in piece]
            self._memo[token_id] = (text, raw)
        return self._memo[token_id]

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        text, raw = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw,
                "top_logprobs": [{"token": self(t)[0], "logprob": lp, "bytes": self(t)[1]} for t, lp in top]}


def _stream_pieces(tokenizer: PreTrainedTokenizerBase, result: GenerationResult) -> list[str]:
    """Per-token text deltas whose concatenation is exactly the completion's text."""
    pieces, emitted = [], ""
    for k in range(1, len(result.token_ids) + 1):
        text = tokenizer.decode(result.token_ids[:k], skip_special_tokens=True)[: len(result.text)]
        ok = text.startswith(emitted) and not text.endswith("\ufffd")  # hold back a half-decoded character
        pieces.append(text[len(emitted):] if ok else "")
        emitted = text if ok else emitted
    if not result.text.startswith(emitted):  # a tokenizer whose decoding is not incremental
        return [result.text]
    if pieces:
        pieces[-1] += result.text[len(emitted):]
    return pieces


def build_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, model_name: str, max_batch: int = 8,
              batch_wait_ms: float = 10, api_key: str | None = None) -> web.Application:
    """The offline teacher's aiohttp application; its batch worker runs while the app runs.

    Args:
        model: a causal LM (from ``load_causal_lm``).
        tokenizer: its tokenizer.
        model_name: the id shown in ``/v1/models`` and in answers (requests may name any model).
        max_batch: most requests decoded together.
        batch_wait_ms: how long a batch waits for more requests to join it.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.

    Returns:
        The application (serve it with ``web.run_app`` or an ``AppRunner``).
    """
    engine = BatchGenerator(model, tokenizer, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    token_text = _TokenText(tokenizer)
    created = int(time.time())

    @web.middleware
    async def openai_errors(request: web.Request, handler):
        if api_key is not None and request.path.startswith("/v1/") and \
                request.headers.get("Authorization", "") != f"Bearer {api_key}":
            return error_response(401, "Incorrect API key provided.", param=None, code="invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPException as err:  # 404/405 in the OpenAI error format
            if err.status < 400:
                raise
            return error_response(err.status, f"{request.method} {request.path}: {err.reason}",
                                  type_="invalid_request_error", code=str(err.status))

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError as err:
            return error_response(400, f"the request body is not valid JSON: {err}")
        try:
            job, stream, include_usage = parse_chat_request(body, tokenizer, engine.max_context)
        except RequestError as err:
            return error_response(err.status, err.message, param=err.param, code=err.code)
        try:
            result: GenerationResult = await asyncio.wrap_future(engine.submit(job))
        except Exception as err:  # noqa: BLE001 - reported to the client as the OpenAI API reports its failures
            return error_response(500, f"generation failed: {type(err).__name__}: {err}", type_="server_error")
        completion_id, created_at = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(result.token_ids),
                 "total_tokens": len(job.prompt_ids) + len(result.token_ids)}
        entries = [token_text.entry(t, lp, top) for t, lp, top in
                   zip(result.token_ids, result.logprobs, result.top or [[]] * len(result.token_ids), strict=True)]
        want_logprobs = bool(body.get("logprobs"))
        if not stream:
            return web.json_response(completion_body(
                completion_id, model_name, result.text, usage, result.finish_reason,
                {"content": entries} if want_logprobs else None, created_at))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)

        async def send(delta: dict | None, finish: str | None = None, logprobs: dict | None = None, **extra) -> None:
            await response.write(sse_event(completion_id, model_name, created_at, delta, finish, logprobs, **extra))

        await send({"role": "assistant", "content": ""})
        for piece, entry in zip(_stream_pieces(tokenizer, result), entries, strict=False):
            await send({"content": piece}, None, {"content": [entry]} if want_logprobs else None)
        await send({}, result.finish_reason)
        if include_usage:
            await send(None, usage=usage)
        await response.write(SSE_DONE)
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "distill-ray"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"model": model_name, "max_batch": max_batch, **engine.stats()})

    async def run_engine(app: web.Application):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = web.Application(middlewares=[openai_errors], client_max_size=16 << 20)
    app[ENGINE] = engine
    app.cleanup_ctx.append(run_engine)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


def model_name_of(spec: str) -> str:
    """The name the server shows for a model spec: SmolLM2-135M-Instruct, a folder's name, or the Hub id."""
    from distill_ray.models import SMOLLM2, SMOLLM2_NAME

    if spec == SMOLLM2:
        return SMOLLM2_NAME
    if spec.startswith(("s3://", "/", ".", "~")) or os.path.isdir(spec):
        return os.path.basename(spec.rstrip("/")) or spec
    return spec


def serve(host: str = "127.0.0.1", port: int = 8100, model_spec: str = "smollm2", max_batch: int = 8,
          api_key_env: str | None = None, threads: int | None = None, batch_wait_ms: float = 10,
          parent_pid: int | None = None) -> None:
    """Load the model and serve it until SIGTERM or SIGINT (blocking).

    Prints ``offline teacher: serving <name> on http://host:port/v1`` once it accepts requests.

    Args:
        host: the interface to listen on.
        port: the port (0 picks a free one; the printed line shows it).
        model_spec: anything ``load_causal_lm`` takes.
        max_batch: most requests decoded together.
        api_key_env: the environment variable holding the bearer token to require; unset or empty
            variable means no authentication.
        threads: torch CPU threads (default: all cores).
        batch_wait_ms: how long a batch waits for more requests to join it.
        parent_pid: stop when this process is gone (a launcher killed with SIGKILL leaves no orphan).
    """
    from distill_ray.models import load_causal_lm

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, tokenizer = load_causal_lm(model_spec)
    name = model_name_of(model_spec)
    api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
    app = build_app(model, tokenizer, model_name=name, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    api_key=api_key)

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        if parent_pid:
            loop.create_task(_stop_with(parent_pid, stopped))
        bound = runner.addresses[0][1] if runner.addresses else port
        auth = "" if not api_key_env else f" (bearer key from ${api_key_env})" if api_key else \
            f" (no authentication: ${api_key_env} is not set)"
        print(f"offline teacher: serving {name} on http://{host}:{bound}/v1{auth}", flush=True)
        try:
            await stopped.wait()
        finally:
            await runner.cleanup()
        print("offline teacher: stopped", flush=True)

    asyncio.run(run())


async def _stop_with(pid: int, stopped: asyncio.Event) -> None:
    while not stopped.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"offline teacher: process {pid} that started it is gone; stopping", flush=True)
            stopped.set()
            return
        except PermissionError:
            pass  # exists, owned by someone else
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill_ray.teacher.offline", description=__doc__.split("\n")[0],
        epilog="example:\n  python -m distill_ray.teacher.offline --port 8100 --max-batch 8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="smollm2", help="'smollm2', a model folder, s3://bucket/prefix or a "
                        "Hugging Face id already in the local cache")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--api-key-env", default=None, help="require this env var's value as the bearer token")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--batch-wait-ms", type=float, default=10,
                        help="how long a batch waits for more requests to join it (default 10)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    args = parser.parse_args(argv)
    serve(host=args.host, port=args.port, model_spec=args.model, max_batch=args.max_batch,
          api_key_env=args.api_key_env, threads=args.threads, batch_wait_ms=args.batch_wait_ms,
          parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
