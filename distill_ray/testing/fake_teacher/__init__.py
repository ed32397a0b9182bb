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

By hand: ``python -m distill_ray.testing.fake_teacher --config '{"latency_s": 0.05}' --port 8000``.
Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /stats``,
``POST /stats/reset`` and ``POST /config`` (merge new knob values into the running server); Azure's
``POST /openai/deployments/{deployment}/chat/completions``; and, under both ``/v1`` and Azure's ``/openai``,
``POST /files`` (multipart ``file`` + ``purpose=batch``), ``GET /files``, ``GET /files/{id}``,
``GET /files/{id}/content``, ``POST /batches``, ``GET /batches``, ``GET /batches/{id}`` and
``POST /batches/{id}/cancel``.
"""

from __future__ import annotations

from distill_ray.testing.fake_teacher.batches import parse_batch_input
from distill_ray.testing.fake_teacher.config import (
                                                     FakeTeacherConfig,
                                                     answer_order_number,
                                                     last_user_text,
                                                     prompt_key,
                                                     tokenize,
)
from distill_ray.testing.fake_teacher.process import FakeTeacher, main, serve
from distill_ray.testing.fake_teacher.server import FakeTeacherServer

__all__ = ["FakeTeacher", "FakeTeacherConfig", "FakeTeacherServer", "answer_order_number", "last_user_text", "main",
           "parse_batch_input", "prompt_key", "serve", "tokenize"]
