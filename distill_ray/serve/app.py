"""The Ray Serve application of step 7: the student behind a safety net, OpenAI-compatible.

Two deployments:
- `student`: the checkpoint in the serve engine (`student.py`): Ray's own LLM deployment
  (`ray.serve.llm`'s LLMServer, vLLM's engine: its CPU build here, the CUDA build on GPU nodes, with
  the engine's GPUs, accelerator type and tensor-parallel placement group), or `StudentServer`
  below with `serve.engine.backend: transformers`; each answer comes with its confidence (mean token
  logprob, from the logprobs the engine returns). Replicas and autoscaling come from `serve:`.
- `Router` (the HTTP ingress): `/v1/chat/completions` (plain and streaming SSE), `/v1/models`,
  `/v1/distill/stats`, `/health`. Per request it picks the path (`policy.py`: shadow, sticky canary,
  full), calls the student deployment and/or the teacher API, falls back to the teacher when the
  student is unsure, slow or failing, and says who answered in `x-served-by` (and why not the
  student in `x-fallback-reason`). The rollout (mode, canary share, confidence threshold) is the
  deployment's `user_config`: `distill-ray rollout` changes it on the live replicas, no restart.

Streaming is real for the student: its first `serve.stream_judge_tokens` tokens are judged (their
mean logprob against the threshold, within the latency budget) and then sent at once, and every
later token leaves as the engine decodes it; an answer judged unsure is replaced by the teacher's
before anything was sent. The teacher's answers (shadow, fallbacks) are sent as chunks once whole.
Metrics go to Ray's Prometheus export (`ray.util.metrics`); request logs to
`<workdir>/serve/logs/` (`logs.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from collections import Counter, defaultdict, deque
from typing import Any

import ray
from ray import serve

from distill_ray.config.schema import Rollout
from distill_ray.serve.policy import Breaker, fallback_reason, student_answers

APP_NAME = "distill"
CONTROL_NAME = f"{APP_NAME}-rollout"
CONTROL_NAMESPACE = "distill-ray"
POLL_S = 0.25


@ray.remote(num_cpus=0)
class RolloutControl:
    """The live rollout and its plan, shared by every router replica (each syncs with it every POLL_S).

    Routers send the outcomes of the student's requests (`plan.Outcome` fields) and get back the
    rollout: with `serve.rollout_plan` set, this actor moves the stages (`plan.RolloutPlan`) and
    books every decision, with its figures, in `serve/rollout.json` and the actor's log.
    `distill-ray rollout` sets the rollout by hand (which pauses a plan) through the admin endpoint;
    a Serve config update of the router's `user_config` (a RayService) reaches it through
    `reconfigure`. A router replica that restarts re-applies the user_config it was deployed with,
    which must not undo a later `distill-ray rollout`: only a user_config that differs from the last
    one applied counts as a change.
    """

    def __init__(self, init: dict[str, Any]):
        from distill_ray.config.schema import Guardrails, Rollout, RolloutStage
        from distill_ray.serve.plan import RolloutPlan

        self.rollout = Rollout.model_validate(init["rollout"])
        self.config_rollout, self.version = dict(init["rollout"]), 0
        self.workdir, self.student = init.get("workdir"), init.get("student")
        self._generation = float(init.get("generation", 0.0))  # when its deployment was made
        self.gate = init.get("gate") or {"passed": True, "reason": ""}
        self.plan = None
        if init.get("plan"):
            self.plan = RolloutPlan([RolloutStage.model_validate(x) for x in init["plan"]],
                                    Guardrails.model_validate(init.get("guardrails") or {}), self.gate["passed"])
        last = self._last_state()
        if last is not None:  # this deployment's control, re-made after it died: where it was
            self.rollout = Rollout.model_validate({k: last[k] for k in Rollout.model_fields})
            if self.plan is not None and last.get("plan"):
                self.plan.restore(last["plan"]["index"], last["plan"]["held"])
        elif self.plan is not None:
            self._change(self.plan.rollout_changes(), by="plan")

    def _last_state(self) -> dict[str, Any] | None:
        """The last rollout this deployment's control recorded (serve/rollout.json), if any."""
        if not self.workdir:
            return None
        from distill_ray.storage import Workdir

        workdir = Workdir(self.workdir)
        if not workdir.exists("serve", "rollout.json"):
            return None
        current = json.loads(workdir.read_bytes("serve", "rollout.json")).get("current") or {}
        return current if current.get("generation") == self._generation and self._generation else None

    def generation(self) -> float:
        return self._generation

    def state(self) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        return self.version, self.rollout.model_dump(), self.plan.status() if self.plan else None

    def sync(self, outcomes: list[tuple]) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """A router's report (outcomes since its last sync) and its answer (the live rollout)."""
        if self.plan is not None and outcomes:
            from distill_ray.serve.plan import Outcome

            decision = self.plan.record([Outcome(*o) for o in outcomes])
            if decision is not None:
                self._decided(decision)
        return self.state()

    def set(self, changes: dict[str, Any], by: str = "rollout") -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """A rollout set by hand (validated by the caller); a moved stage pauses the plan."""
        if self.plan is not None and self.plan.held is None and {"mode", "canary_percent"} & set(changes):
            self._decided(self.plan.pause(f"the rollout was set by hand ({by})"))
        self._change(changes, by)
        return self.state()

    def plan_command(self, command: str) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        if self.plan is None:
            raise ValueError("no serve.rollout_plan in this deployment")
        if command == "pause":
            self._decided(self.plan.pause("paused by an admin"))
        elif command == "resume":
            self._decided(self.plan.resume())
            self._change(self.plan.rollout_changes(), by="plan")
        else:
            raise ValueError(f"plan: 'pause' or 'resume', not {command!r}")
        return self.state()

    def apply_config(self, rollout: dict[str, Any]) -> int:
        if rollout and rollout != self.config_rollout:
            self.config_rollout = dict(rollout)
            self.set(rollout, by="user_config")
        return self.version

    def _change(self, changes: dict[str, Any], by: str) -> None:
        from distill_ray.config.schema import Rollout

        self.rollout = Rollout.model_validate({**self.rollout.model_dump(), **changes})
        self.version += 1
        self._record(by)

    def _decided(self, decision: dict[str, Any]) -> None:
        print(f"rollout plan: {decision['action']} {decision['from']} -> {decision['to']}: {decision['reason']} "
              f"{json.dumps(decision['figures'])}", flush=True)
        if decision["from"] != decision["to"]:
            self._change(self.plan.rollout_changes(), by=f"plan:{decision['action']}")
        self._record(f"plan:{decision['action']}", decision)

    def _record(self, by: str, decision: dict[str, Any] | None = None) -> None:
        if not self.workdir:
            return
        from distill_ray.serve.step import record_rollout
        from distill_ray.storage import Workdir

        plan = {"index": self.plan.index, "held": self.plan.held} if self.plan is not None else None
        try:
            record_rollout(Workdir(self.workdir), self.rollout.model_dump(), by, self.student, decision,
                           state={"generation": self._generation, "plan": plan})
        except OSError as exc:  # the decision stands; its record is best effort
            print(f"rollout: could not write serve/rollout.json: {exc}", flush=True)


def control_actor(init: dict[str, Any] | None = None):
    """The app's RolloutControl (None when missing and no `init`). With `init`, one of this deployment
    or a later one: an actor left by an earlier deployment (e.g. re-created by its routers as they
    went away) is replaced, so a redeploy's rollout plan is never lost to a stale one."""
    from distill_ray.ray_env import on_this_node

    for _ in range(100):
        try:
            actor = ray.get_actor(CONTROL_NAME, namespace=CONTROL_NAMESPACE)
        except ValueError:
            if init is None:
                return None
            # On the caller's node (the driver's, or a router's): a lost worker node must not take it along.
            actor = RolloutControl.options(name=CONTROL_NAME, namespace=CONTROL_NAMESPACE, lifetime="detached",
                                           get_if_exists=True, scheduling_strategy=on_this_node()).remote(init)
        if init is None:
            return actor
        try:
            generation = ray.get(actor.generation.remote(), timeout=60)
        except ray.exceptions.RayActorError:  # one being killed: its name is not free yet
            time.sleep(0.1)
            continue
        if generation >= init.get("generation", 0.0):
            return actor
        ray.kill(actor, no_restart=True)
        time.sleep(0.1)
    raise RuntimeError(f"the rollout control actor '{CONTROL_NAME}' could not be reached")


LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
# Prometheus histograms take positive bucket bounds: the confidence is exported negated (-mean logprob).
UNCERTAINTY_BOUNDARIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5]
AGREEMENT_BOUNDARIES = [0.25, 0.5, 0.75, 0.9, 0.99]
GAUGE_EVERY_S = 5.0  # Ray exports a gauge only for a while after it was set: set it again this often
UNSUPPORTED = {  # request keys the student cannot honour: refused clearly rather than ignored
    "tools": "the student cannot call tools", "functions": "the student cannot call functions",
    "tool_choice": "the student cannot call tools", "function_call": "the student cannot call functions",
    "audio": "the student reads and writes text only", "modalities": "the student reads and writes text only",
    "prediction": "predicted outputs are not supported", "logit_bias": "logit_bias is not supported",
}
_ORIGIN = re.compile(r"^[a-z0-9_:.-]{1,40}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class RequestError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


def parse_chat_request(raw: bytes, max_bytes: int, max_tokens_cap: int = 1 << 30, max_depth: int = 64
                       ) -> dict[str, Any]:
    """Validate a /v1/chat/completions body; raises RequestError (400/413) naming what is wrong."""
    if len(raw) > max_bytes:
        raise RequestError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes} (serve.max_request_bytes)",
                           code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, f"the body nests deeper than {max_depth} levels (serve.max_json_depth)",
                           code="too_deep") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if json_depth(body) > max_depth:
        raise RequestError(400, f"the body nests deeper than {max_depth} levels (serve.max_json_depth)",
                           code="too_deep")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"messages[{i}].role must be system, developer, user or assistant",
                               param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(400, f"messages[{i}].content[{j}] is of type {kind!r}: the student reads text "
                                       "parts only", param=f"messages[{i}].content[{j}]", code="unsupported_content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param=f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(400, f"'{key}' must be an integer", param=key)
        if not 1 <= value <= max_tokens_cap:
            raise RequestError(400, f"'{key}' must be within 1..{max_tokens_cap} (serve.max_tokens), not {value}",
                               param=key)
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or not 0 <= temperature <= 2):
        raise RequestError(400, "'temperature' must be a number within 0..2", param="temperature")
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "only n=1 is supported: the student gives one answer per request", param="n")
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
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop)):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    for key, kind, what in (("user", str, "a string"), ("stream", bool, "a boolean"), ("metadata", dict, "an object")):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise RequestError(400, f"'{key}' must be {what}", param=key)
    return {**body, "messages": clean}


def strip_few_shot(messages: list[dict[str, str]], few_shot: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without the task's few-shot turns, where a client still sends them (as it
    did to the teacher): the student was trained without them and answers from the message alone."""
    n = len(few_shot)
    if not n:
        return messages
    for start in range(len(messages) - n + 1):
        if messages[start:start + n] == few_shot:
            return messages[:start] + messages[start + n:]
    return messages


def completion_body(request_id: str, model: str, text: str, usage: dict[str, int], finish: str = "stop"
                    ) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage}


def sse_event(request_id: str, model: str, created: int, delta: dict[str, Any],
              finish_reason: str | None = None) -> bytes:
    """One OpenAI chat.completion.chunk as an SSE event."""
    chunk = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def sse_chunks(request_id: str, model: str, text: str, finish: str = "stop"):
    """The answer as OpenAI chat.completion.chunk events (role, content pieces, finish), then [DONE]."""
    created = int(time.time())

    def event(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return sse_event(request_id, model, created, delta, finish_reason)

    yield event({"role": "assistant", "content": ""}, None)
    pieces, word = [], ""
    for ch in text:  # words with their leading whitespace, as tokens stream
        if ch.isspace() and word.strip():
            pieces.append(word)
            word = ""
        word += ch
    if word:
        pieces.append(word)
    for piece in pieces:
        yield event({"content": piece}, None)
    yield event({}, finish)
    yield b"data: [DONE]\n\n"


@serve.deployment(name="student", ray_actor_options={"num_cpus": 1})
class StudentServer:
    """The student checkpoint in distill-ray's own deployment, with `serve.engine.backend: transformers`
    (any ChatEngine works here); answers with their confidence, whole (`generate`) or as they are
    decoded (`stream`)."""

    def __init__(self, model_uri: str, name: str, engine: dict[str, Any] | None = None):
        from distill_ray.config.schema import Engine
        from distill_ray.engine import open_engine

        self.name = name
        self.engine = open_engine(model_uri, Engine.model_validate(engine or {}))
        self.parameters = self.engine.info()["parameters"]

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0
                       ) -> dict[str, Any]:
        start = time.perf_counter()
        answer = await self.engine.generate(messages, max_tokens, temperature)
        return {"text": answer.text.strip(), "confidence": answer.confidence, "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                "compute_ms": (time.perf_counter() - start) * 1000}

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0):
        """{"text", "logprobs"} pieces as the engine decodes them, then the whole answer with "done": True."""
        from distill_ray.engine import Answer

        start = time.perf_counter()
        async for item in self.engine.stream(messages, max_tokens, temperature):
            if isinstance(item, Answer):
                yield {"done": True, "text": item.text.strip(), "confidence": item.confidence,
                       "finish_reason": item.finish_reason, "prompt_tokens": item.prompt_tokens,
                       "completion_tokens": item.completion_tokens, "compute_ms": (time.perf_counter() - start) * 1000}
            else:
                yield {"text": item.text, "logprobs": item.logprobs}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "parameters": self.parameters, "pid": os.getpid(), **self.engine.info()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class _Metrics:
    """Ray's Prometheus export (scraped from every node's metrics agent). `category` is a bounded
    label: a known slice, `unknown` (none sent) or `other` (serve.categories)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter("distill_serve_requests_total", "Requests answered, by who answered and slice.",
                                        tag_keys=("served_by", "mode", "category"))
        self.fallbacks = metrics.Counter("distill_serve_fallbacks_total", "Student answers replaced by the teacher's.",
                                         tag_keys=("reason", "category"))
        self.student_requests = metrics.Counter(
            "distill_serve_student_requests_total", "Requests routed to the student (canary, full), by slice: the "
            "denominator of the fallback rate.", tag_keys=("category",))
        self.errors = metrics.Counter("distill_serve_errors_total", "Requests answered with an error.",
                                      tag_keys=("status",))
        self.confidence = metrics.Histogram("distill_serve_student_uncertainty",
                                            "Student confidence, negated: -(mean token logprob) of each answer.",
                                            boundaries=UNCERTAINTY_BOUNDARIES, tag_keys=("category",))
        self.latency = metrics.Histogram("distill_serve_latency_ms", "Request latency in ms, by who answered and slice.",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("served_by", "category"))
        # agreement per comparison (1.0: the same answer; partial for token_f1): _sum / _count is the mean
        self.shadow = metrics.Histogram("distill_serve_shadow_agreement", "Shadow comparisons: the student's agreement "
                                        "with the teacher's answer, by slice.", boundaries=AGREEMENT_BOUNDARIES,
                                        tag_keys=("category",))
        self.log_lines = metrics.Counter("distill_serve_log_lines_total", "Request log lines, by outcome.",
                                         tag_keys=("outcome",))
        self.canary = metrics.Gauge("distill_serve_rollout_percent",
                                    "Share of users the student answers (0 in shadow mode, 100 in full).")


class _Stats:
    """This replica's counters for /v1/distill/stats (Prometheus has the cluster-wide series)."""

    def __init__(self):
        self.started = time.time()
        self.served_by: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=20000))
        self.shadow: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        # per slice: requests, routed to the student, fallbacks, latencies, student confidences
        self.slices: dict[str, dict[str, Any]] = defaultdict(lambda: {
            "requests": 0, "student_requests": 0, "fallbacks": 0, "latency": deque(maxlen=5000),
            "confidence": deque(maxlen=5000)})

    def snapshot(self) -> dict[str, Any]:
        def pct(values: list[float], p: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

        latency = {who: {"count": len(v), "p50_ms": pct(list(v), 50), "p95_ms": pct(list(v), 95),
                         "p99_ms": pct(list(v), 99)} for who, v in self.latency.items()}
        total = sum(self.served_by.values())
        slices = {c: {"requests": s["requests"], "student_requests": s["student_requests"], "fallbacks": s["fallbacks"],
                      "fallback_rate": round(s["fallbacks"] / s["student_requests"], 4) if s["student_requests"] else None,
                      "p50_ms": pct(list(s["latency"]), 50), "p95_ms": pct(list(s["latency"]), 95),
                      "mean_confidence": round(sum(s["confidence"]) / len(s["confidence"]), 4) if s["confidence"]
                      else None} for c, s in sorted(self.slices.items())}
        return {"since": self.started, "requests": total, "served_by": dict(self.served_by),
                "fallbacks": dict(self.fallbacks), "errors": dict(self.errors),
                "fallback_rate": round(sum(self.fallbacks.values()) / total, 4) if total else None,
                "latency": latency, "slices": slices,
                "shadow_agreement": {c: {"requests": n, "agreement": round(s / n, 4)}
                                     for c, (s, n) in sorted(self.shadow.items()) if n}}


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@serve.deployment(name="router", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000)
class Router:
    """The OpenAI-compatible ingress: routing, fallback, auth, limits, metrics, request logs."""

    def __init__(self, student: Any, config_json: dict[str, Any], student_name: str, token_sha256: str | None = None,
                 admin_sha256: str | None = None, generation: float = 0.0):
        from distill_ray.config.schema import PipelineConfig
        from distill_ray.metrics import metric
        from distill_ray.serve.logs import RequestLog
        from distill_ray.serve.step import known_categories, student_gate
        from distill_ray.serve.student import StudentClient
        from distill_ray.storage import Workdir

        self.config = PipelineConfig.model_validate(config_json)
        s = self.config.serve
        if (token_sha256 is None or admin_sha256 is None) and not s.allow_open_endpoint:
            raise ValueError("serve: the router needs the API token's and the admin token's hashes "
                             "(serve.auth_token_env, serve.admin_token_env), or serve.allow_open_endpoint: true")
        # Ray's LLM deployment (backend vllm) or distill-ray's StudentServer (backend transformers)
        self.student = StudentClient(student, student_name, ray_llm=s.engine.backend == "vllm")
        self.student_name = student_name
        teacher_name = s.teacher or self.config.teachers[0].name
        self.teacher = next(t for t in self.config.teachers if t.name == teacher_name)
        self.teacher_key = os.environ.get(self.teacher.api_key_env) if self.teacher.api_key_env else None
        # The teacher's one ledger (its limits and the pipeline's budget_usd, shared with generate and
        # eval's judge): every fallback and shadow call draws a lease from it and books its cost.
        workdir = Workdir(self.config.workdir)
        self.teacher_ledger = self._open_ledger()
        # The tokens' SHA-256, computed where `distill-ray serve` read serve.auth_token_env and
        # serve.admin_token_env: the tokens themselves never travel to the cluster nor sit in a config.
        self.token_sha256, self.admin_sha256 = token_sha256, admin_sha256
        name = "token_f1" if self.config.task.metric == "llm_judge" else self.config.task.metric
        self.agreement = metric(name, self.config.task.metric_pattern)
        self.categories = set(s.categories if s.categories is not None else known_categories(workdir))
        # The eval gate, judged here from the workdir: no client of the control endpoint can skip it.
        self.gate = student_gate(self.config, workdir, student_name)
        self.rollout = Rollout(mode=s.mode, canary_percent=s.canary_percent, min_confidence=s.min_confidence,
                               latency_budget_ms=s.latency_budget_ms)
        self._check_gate(self.rollout)
        self.breaker = Breaker(s.breaker_failures, s.breaker_cooldown_s)
        plan = [stage.model_dump(mode="json") for stage in s.rollout_plan] if s.rollout_plan else None
        self.control_init = {"rollout": self.rollout.model_dump(), "plan": plan, "guardrails": s.guardrails.model_dump(),
                             "gate": {"passed": self.gate[0], "reason": self.gate[1]}, "workdir": self.config.workdir,
                             "student": student_name, "generation": generation}
        self.control = control_actor(self.control_init)
        self.control_version, self.plan_status = -1, None
        self.outcomes: list[tuple] = []  # for the rollout plan, sent to the control actor at each sync
        self._apply(*ray.get(self.control.state.remote()))  # a restarted replica resumes the live rollout
        self.poller: asyncio.Task | None = None
        self.salt = self.config.name
        self.few_shot = [m for t in self.config.task.few_shot for m in ({"role": "user", "content": t.user},
                                                                         {"role": "assistant", "content": t.assistant})]
        self.log = RequestLog(workdir, batch_size=s.log_batch_size, flush_s=s.log_flush_s,
                              max_queued=s.log_queue_max, block_s=s.log_block_s)
        self.metrics = _Metrics()
        self.stats = _Stats()
        self.session = None
        self.background: set[asyncio.Task] = set()

    def _open_ledger(self):
        """This replica's lease on the teacher's ledger (re-opened if the ledger actor died with its node:
        a new one reads the spend persisted in the workdir)."""
        from distill_ray.storage import Workdir
        from distill_ray.teacher.ledger import LeaseClient, open_ledger, read_spend

        workdir = Workdir(self.config.workdir)
        others = sum(read_spend(workdir, t.name)["spent_usd"] for t in self.config.teachers if t.name != self.teacher.name)
        ttl = self.config.generate.lease_ttl_s
        return LeaseClient(open_ledger(self.teacher, workdir, self.config.budget_usd, ttl, others), 1,
                           holder=f"serve:{ray.get_runtime_context().get_actor_id()}", step="serve_fallback",
                           flush_s=0.5, ttl_s=ttl)

    def _check_gate(self, rollout: Rollout) -> None:
        if rollout.mode != "shadow" and not self.gate[0]:
            raise RequestError(409, f"student '{self.student_name}' may not answer clients in {rollout.mode} mode: "
                               f"{self.gate[1]}", code="eval_gate")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A Serve config update of the router's user_config (e.g. a RayService): the new rollout,
        for every replica, through the control actor; a bad one fails the update, visibly."""
        if user_config:
            wanted = Rollout.model_validate({**self.rollout.model_dump(), **user_config})
            self._check_gate(wanted)
            ray.get(self.control.apply_config.remote(user_config))
        self._apply(*ray.get(self.control.state.remote()))

    def _apply(self, version: int, rollout: dict[str, Any], plan: dict[str, Any] | None) -> None:
        self.plan_status = plan
        if version != self.control_version:
            self.rollout = Rollout.model_validate(rollout)
            self.control_version = version
            self._gauge_rollout()

    def _gauge_rollout(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            r = self.rollout
            metrics.canary.set({"shadow": 0.0, "canary": r.canary_percent, "full": 100.0}[r.mode])

    async def _poll(self) -> None:
        gauged = 0.0
        while True:
            if time.monotonic() - gauged > GAUGE_EVERY_S:
                self._gauge_rollout()
                gauged = time.monotonic()
            outcomes, self.outcomes = self.outcomes, []
            try:
                self._apply(*await self.control.sync.remote(outcomes))
            except Exception:  # noqa: BLE001 - keep serving with the last rollout; the control actor restarts
                self.control = control_actor(self.control_init)
            await asyncio.sleep(POLL_S)

    def _plan_outcome(self, latency_ms: float | None, *, fallback: bool = False, error: bool = False,
                      agreement: float | None = None) -> None:
        if self.plan_status is not None and latency_ms is not None:
            self.outcomes.append((self.plan_status["index"], latency_ms, fallback, error, agreement))

    # ------------------------------------------------------------------------------------------ HTTP
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self.poller is None:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        path, method = request.url.path.rstrip("/"), request.method
        # Serve's own request id (its proxy sets one, or keeps the client's, and sends it back as x-request-id)
        serve_id = request.headers.get("x-request-id") or ""
        record: dict[str, Any] = {"request_id": serve_id if _REQUEST_ID.match(serve_id) else uuid.uuid4().hex[:24],
                                  "time": time.time()}
        try:
            if path.endswith("/health"):
                return JSONResponse({"status": "ok"})
            if "/v1/distill/" in path:  # the control endpoints: the admin token only
                self._authorize(request.headers.get("authorization"), admin=True)
                if path.endswith("/v1/distill/stats") and method == "GET":
                    return JSONResponse(self._stats_body())
                if path.endswith("/v1/distill/rollout") and method == "POST":
                    return JSONResponse(await self._set_rollout(await self._read_body(request)))
                raise RequestError(404, f"no route {method} {request.url.path}", code="not_found")
            admin = self._authorize(request.headers.get("authorization"))
            if path.endswith("/v1/models") and method == "GET":
                return JSONResponse(self._models())
            if path.endswith("/v1/chat/completions") and method == "POST":
                # x-distill-origin tags traffic that is not clients' (the replayed holdout): drift compares it
                # with its own reference, the flywheel leaves it out; so only an admin may set it
                origin = request.headers.get("x-distill-origin") if admin else None
                record["origin"] = origin if origin and _ORIGIN.match(origin) else None
                return await self._chat(request, record)
            raise RequestError(404, f"no route {method} {request.url.path}", code="not_found")
        except RequestError as err:
            return await self._error(err, record, path)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: an OpenAI-shaped 500, logged, never a traceback page
            import traceback

            record["error_trace"] = traceback.format_exc(limit=-4)[-2000:]  # in the log, not to the client
            return await self._error(RequestError(500, f"internal error: {type(exc).__name__}", type_="api_error",
                                                  code="internal_error"), record, path)

    async def _error(self, err: RequestError, record: dict[str, Any], path: str):
        from starlette.responses import JSONResponse

        self.stats.errors[str(err.status)] += 1
        self.metrics.errors.inc(tags={"status": str(err.status)})
        if path.endswith("/chat/completions"):  # logged like the rest (control calls and probes are not traffic)
            if record.get("student_path"):
                self._plan_outcome(record.get("student_latency_ms") or 0.0, fallback=True, error=True)
            for key in ("user", "category", "origin", "mode", "prompt"):  # every line has the same keys
                record.setdefault(key, None)
            record.update({"status": err.status, "error": err.message[:500], "error_code": err.code,
                           "served_by": None})
            await self._log(record)
        headers = {"www-authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def _log(self, record: dict[str, Any]) -> None:
        self.metrics.log_lines.inc(tags={"outcome": "queued" if await self.log.put(record) else "dropped"})

    def _authorize(self, header: str | None, admin: bool = False) -> bool:
        """API endpoints take the API token (or the admin's); control endpoints the admin token only.
        True when the caller holds the admin token (or the endpoint is open to all)."""
        if self.token_sha256 is None and self.admin_sha256 is None:
            return True  # serve.allow_open_endpoint
        given = _sha256(header[7:] if header and header.lower().startswith("bearer ") else "")
        is_admin = self.admin_sha256 is None or hmac.compare_digest(given, self.admin_sha256)
        is_client = self.token_sha256 is not None and hmac.compare_digest(given, self.token_sha256)
        if admin:
            if is_admin:
                return True
            if is_client:
                raise RequestError(403, "the API token may not control the app: the control endpoints take the admin "
                                   "token (serve.admin_token_env)", type_="permission_error", code="admin_only")
        elif is_client or is_admin or self.token_sha256 is None:
            return is_admin
        raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <serve.auth_token_env>)",
                           type_="authentication_error", code="invalid_api_key")

    def _models(self) -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": self.student_name, "object": "model", "created": now, "owned_by": "distill-ray"},
            {"id": self.teacher.model, "object": "model", "created": now, "owned_by": f"teacher:{self.teacher.name}"}]}

    async def _set_rollout(self, raw: bytes) -> dict[str, Any]:
        """`distill-ray rollout` lands here: validated by the config's own Rollout, gated by eval, then
        set for every router replica (the control actor). {"plan": "pause"|"resume"} steers the plan."""
        try:
            changes = json.loads(raw)
            if not isinstance(changes, dict) or not changes:
                raise ValueError("send a JSON object with mode, canary_percent, min_confidence, latency_budget_ms "
                                 "and/or plan")
            if "plan" in changes:
                if set(changes) != {"plan"}:
                    raise ValueError("'plan' goes alone")
                previous = self.rollout.model_dump()
                self._apply(*await self.control.plan_command.remote(changes["plan"]))
                return {"rollout": self.rollout.model_dump(), "previous": previous, "plan": self.plan_status}
            wanted = Rollout.model_validate({**self.rollout.model_dump(), **changes})
        except (ValueError, TypeError, ray.exceptions.RayTaskError) as exc:
            message = str(exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc).splitlines()
            raise RequestError(400, "rollout: " + "; ".join(line.strip() for line in message if line.strip()
                                                            and "errors.pydantic.dev" not in line)) from None
        from distill_ray.serve.step import student_gate
        from distill_ray.storage import Workdir

        self.gate = student_gate(self.config, Workdir(self.config.workdir), self.student_name)  # as eval stands now
        self._check_gate(wanted)
        previous = self.rollout.model_dump()
        self._apply(*await self.control.set.remote(changes))
        return {"rollout": self.rollout.model_dump(), "previous": previous, "plan": self.plan_status}

    def _stats_body(self) -> dict[str, Any]:
        return {"student": self.student_name, "teacher": self.teacher.name, "rollout": self.rollout.model_dump(),
                "plan": self.plan_status, "eval_gate": {"passed": self.gate[0], "reason": self.gate[1]},
                "student_breaker": {"state": self.breaker.state, "opened": self.breaker.opened},
                "request_log": self.log.stats(), **self.stats.snapshot()}

    async def _read_body(self, request) -> bytes:
        """The body, read as it arrives and refused (413) once past serve.max_request_bytes, whether it
        declared its length or came chunked."""
        limit = self.config.serve.max_request_bytes
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

    def _category(self, request, metadata: dict[str, Any]) -> str:
        sent = request.headers.get("x-category") or metadata.get("category")
        if not sent:
            return "unknown"
        return sent if isinstance(sent, str) and sent in self.categories else "other"

    async def _chat(self, request, record: dict[str, Any]):
        from starlette.responses import JSONResponse, StreamingResponse

        t0 = time.perf_counter()
        s = self.config.serve
        raw = await self._read_body(request)  # Serve fetches the body from its HTTP proxy: a wait, not our work
        body_ms = (time.perf_counter() - t0) * 1000
        body = parse_chat_request(raw, s.max_request_bytes, s.max_tokens, s.max_json_depth)
        request_id = record["request_id"]
        user = str(body.get("user") or request.headers.get("x-user-id") or "")
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        category = self._category(request, metadata)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or self.teacher.max_tokens)
        temperature = float(body.get("temperature") or 0.0)
        rollout = self.rollout
        record.update({"user": user or None, "category": category, "mode": rollout.mode,
                       # the conversation without system and few-shot turns: what the student answers,
                       # what drift compares and what the flywheel distils from
                       "prompt": [m for m in strip_few_shot(body["messages"], self.few_shot) if m["role"] != "system"]})
        answer = await self._answer(body, rollout, user or request_id, category, max_tokens, temperature, record)
        who = answer["served_by"]
        headers = {"x-served-by": who}
        if answer.get("fallback_reason"):
            headers["x-fallback-reason"] = answer["fallback_reason"]
        model = self.student_name if who == "student" else self.teacher.model
        if "live" in answer:  # the student's stream, judged on its first tokens: the rest as it is decoded
            return StreamingResponse(self._live_sse(answer, request_id, model, t0, body_ms, rollout, record),
                                     media_type="text/event-stream", headers=headers)
        await self._finish(record, answer, rollout, t0, body_ms)
        if body.get("stream"):
            return StreamingResponse(sse_chunks(request_id, model, answer["text"], answer["finish_reason"]),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(completion_body(request_id, model, answer["text"], answer["usage"], answer["finish_reason"]),
                            headers=headers)

    async def _finish(self, record: dict[str, Any], answer: dict[str, Any], rollout: Rollout, t0: float,
                      body_ms: float) -> None:
        """Count, time and log an answered request."""
        latency_ms = (time.perf_counter() - t0) * 1000
        who, category = answer["served_by"], record["category"]
        # the router's own work: its time minus its waits (the body, the student, the teacher)
        router_ms = latency_ms - body_ms - answer["waited_ms"]
        record.update({"status": 200, "served_by": who, "fallback_reason": answer.get("fallback_reason"),
                       "latency_ms": round(latency_ms, 2), "router_ms": round(router_ms, 3), "answer": answer["text"]})
        if "first_token_ms" in answer:
            record["first_token_ms"] = round(answer["first_token_ms"], 2)
        self.stats.served_by[who] += 1
        self.stats.latency[who].append(latency_ms)
        slice_ = self.stats.slices[category]
        slice_["requests"] += 1
        slice_["latency"].append(latency_ms)
        self.metrics.requests.inc(tags={"served_by": who, "mode": rollout.mode, "category": category})
        self.metrics.latency.observe(latency_ms, tags={"served_by": who, "category": category})
        if record.get("student_path"):
            reason = answer.get("fallback_reason")
            slice_["student_requests"] += 1
            slice_["fallbacks"] += reason is not None
            self._plan_outcome(latency_ms, fallback=reason is not None,
                               error=reason in ("student_error", "student_unavailable") or bool(answer.get("error")))
        if rollout.mode != "shadow":
            await self._log(record)  # in shadow mode the background comparison logs the line, with both answers

    async def _live_sse(self, answer: dict[str, Any], request_id: str, model: str, t0: float, body_ms: float,
                        rollout: Rollout, record: dict[str, Any]):
        """SSE events of a student stream: the judged first tokens at once, then each piece as it arrives."""
        created = int(time.time())
        live = answer.pop("live")

        def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return sse_event(request_id, model, created, delta, finish_reason)

        text, final = "".join(answer["pieces"]), None
        try:
            yield event({"role": "assistant", "content": text})
            answer["first_token_ms"] = (time.perf_counter() - t0) * 1000
            if not answer.get("done"):
                async for item in live:
                    if item.get("done"):
                        final = item
                        break
                    if item["text"]:
                        text += item["text"]
                        yield event({"content": item["text"]})
            final = final or answer.get("final") or {}
            yield event({}, final.get("finish_reason") or "stop")
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - the replica died mid-stream: the client gets what was sent
            answer["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            record["student_error"] = answer["error"]
            self.breaker.record(ok=False)
            yield event({}, "error")
        finally:
            live.cancel()
            answer.update({"text": text.strip(), "waited_ms": (time.perf_counter() - t0) * 1000 - body_ms})
            await self._finish(record, answer, rollout, t0, body_ms)

    async def _answer(self, body, rollout: Rollout, user_key: str, category: str, max_tokens: int, temperature: float,
                      record: dict[str, Any]) -> dict[str, Any]:
        messages = body["messages"]
        if rollout.mode == "shadow":
            teacher = await self._teacher(messages, max_tokens, temperature, body, record)
            task = asyncio.get_running_loop().create_task(
                self._shadow(messages, max_tokens, temperature, category, teacher["text"], record))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return {**teacher, "waited_ms": teacher["latency_ms"]}
        if not student_answers(rollout, user_key, self.salt):
            teacher = await self._teacher(messages, max_tokens, temperature, body, record)
            return {**teacher, "waited_ms": teacher["latency_ms"]}
        record["student_path"] = True
        self.metrics.student_requests.inc(tags={"category": category})
        # past the latency budget the answer could not be served anyway: stop waiting there
        if body.get("stream"):
            student = await self._student_stream(messages, max_tokens, temperature,
                                                 timeout_s=rollout.latency_budget_ms / 1000)
        else:
            student = await self._student(messages, max_tokens, temperature,
                                          timeout_s=rollout.latency_budget_ms / 1000)
        record.update({"student_confidence": student.get("confidence"), "student_latency_ms": student.get("latency_ms"),
                       "student_error": student.get("error")})
        if student.get("confidence") is not None:
            self.metrics.confidence.observe(-student["confidence"], tags={"category": category})
            self.stats.slices[category]["confidence"].append(student["confidence"])
        reason = fallback_reason(rollout, error=student.get("error"), confidence=student.get("confidence"),
                                 latency_ms=student.get("latency_ms"), timed_out=student.get("timed_out", False),
                                 unavailable=student.get("unavailable", False))
        if reason is None:
            return {**student, "waited_ms": student["latency_ms"]}
        self.stats.fallbacks[reason] += 1
        self.metrics.fallbacks.inc(tags={"reason": reason, "category": category})
        if "live" in student:
            student.pop("live").cancel()  # judged unsure on its first tokens: none of it was sent
        record["student_answer"] = student.get("text")
        try:
            teacher = await self._teacher(messages, max_tokens, temperature, body, record)
        except RequestError as err:
            if err.code == "insufficient_quota" and student.get("text") and not student.get("error") \
                    and student.get("done", True):
                record["fallback_skipped"] = "budget"  # no teacher money left: the student's answer stands
                return {**student, "waited_ms": student["latency_ms"]}
            raise RequestError(502, f"the student could not be served ({reason}: {student.get('error') or 'see x-fallback-reason'}) "
                               f"and the teacher failed too: {err.message}", type_="api_error", code="upstream_failed") from None
        return {**teacher, "fallback_reason": reason, "waited_ms": student["latency_ms"] + teacher["latency_ms"]}

    async def _student(self, messages, max_tokens: int, temperature: float, timeout_s: float) -> dict[str, Any]:
        if not self.breaker.allow():  # the student keeps failing: do not make this request wait for it
            return {"error": None, "unavailable": True, "latency_ms": 0.0}
        messages = strip_few_shot(messages, self.few_shot)
        start = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.student.generate(messages, max_tokens, temperature), timeout_s)
        except TimeoutError:
            self.breaker.record(ok=False)
            return {"error": None, "timed_out": True, "latency_ms": (time.perf_counter() - start) * 1000}
        except Exception as exc:  # noqa: BLE001 - a dead or failing replica: the teacher answers instead
            self.breaker.record(ok=False)
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "latency_ms": (time.perf_counter() - start) * 1000}
        self.breaker.record(ok=True)
        return {**out, "served_by": "student", "latency_ms": (time.perf_counter() - start) * 1000,
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                          "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}}

    async def _student_stream(self, messages, max_tokens: int, temperature: float, timeout_s: float) -> dict[str, Any]:
        """Start the student's stream and read it up to `serve.stream_judge_tokens` tokens (or its end) within
        the budget; the confidence judged is those tokens' mean logprob. The rest stays in `live`."""
        if not self.breaker.allow():
            return {"error": None, "unavailable": True, "latency_ms": 0.0}
        messages = strip_few_shot(messages, self.few_shot)
        start = time.perf_counter()
        live = self.student.stream(messages, max_tokens, temperature)
        pieces: list[str] = []
        logprobs: list[float] = []
        final = None
        try:
            async with asyncio.timeout(timeout_s):
                async for item in live:
                    if item.get("done"):
                        final = item
                        break
                    pieces.append(item["text"])
                    logprobs += item["logprobs"]
                    if len(logprobs) >= self.config.serve.stream_judge_tokens:
                        break
        except TimeoutError:
            live.cancel()
            self.breaker.record(ok=False)
            return {"error": None, "timed_out": True, "latency_ms": (time.perf_counter() - start) * 1000}
        except Exception as exc:  # noqa: BLE001 - a dead or failing replica: the teacher answers instead
            live.cancel()
            self.breaker.record(ok=False)
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "latency_ms": (time.perf_counter() - start) * 1000}
        self.breaker.record(ok=True)
        confidence = final["confidence"] if final else (sum(logprobs) / len(logprobs) if logprobs else None)
        usage = {"prompt_tokens": (final or {}).get("prompt_tokens", 0),
                 "completion_tokens": (final or {}).get("completion_tokens", len(logprobs))}
        return {"served_by": "student", "text": "".join(pieces), "pieces": pieces, "confidence": confidence,
                "finish_reason": (final or {}).get("finish_reason", "stop"), "live": live, "done": final is not None,
                "final": final, "latency_ms": (time.perf_counter() - start) * 1000,
                "usage": {**usage, "total_tokens": sum(usage.values())}}

    async def _teacher(self, messages, max_tokens: int, temperature: float, body: dict[str, Any],
                       record: dict[str, Any]) -> dict[str, Any]:
        """The teacher's answer, through its ledger (limits and budget_usd); 429 insufficient_quota when
        the budget is spent, as OpenAI answers when a quota is. What was asked and paid goes in
        record["teacher"] (the flywheel reuses answers already paid for)."""
        import aiohttp

        from distill_ray.teacher.cache import messages_digest
        from distill_ray.teacher.client import (
            RetryableError,
            auth_headers,
            chat_url,
            cost_usd,
            estimate_tokens,
            parse_body,
        )

        t = self.teacher
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=t.timeout_s))
        payload = {"model": t.model, "messages": messages, t.token_limit_param: max_tokens, **t.extra_body}
        if t.temperature is not None:
            payload["temperature"] = temperature
        for key in ("stop", "top_p", "seed"):
            if body.get(key) is not None:
                payload[key] = body[key]
        if t.reasoning_effort is not None:
            payload["reasoning_effort"] = t.reasoning_effort
        if t.response_format is not None:
            payload["response_format"] = t.response_format
        if t.logprobs:  # as generate asks: the logged answer is then one the flywheel can reuse whole
            payload["logprobs"] = True
            if t.top_logprobs:
                payload["top_logprobs"] = t.top_logprobs
        asked = {"name": t.name, "model": t.model, "max_tokens": max_tokens, "temperature": payload.get("temperature"),
                 "messages_sha256": messages_digest(messages),
                 "params": {k: payload[k] for k in ("stop", "top_p", "seed", "reasoning_effort") if k in payload}}
        headers = auth_headers(t, self.teacher_key)
        url = chat_url(t)
        est_tokens, est_cost = estimate_tokens(messages) + max_tokens, cost_usd(t, estimate_tokens(messages), max_tokens)
        last = "no attempt"
        start = time.perf_counter()
        for attempt in range(3):
            try:
                granted = await self.teacher_ledger.acquire(est_tokens, est_cost)
            except ray.exceptions.RayError as exc:  # the ledger's node went away: wait for it, or make it anew
                last = f"the teacher's ledger is unreachable ({type(exc).__name__})"
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    self.teacher_ledger = self._open_ledger()
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if not granted:
                raise RequestError(429, f"teacher '{t.name}': budget_usd is spent (the pipeline's teacher budget, "
                                   "shared by generate, eval and serve)", type_="insufficient_quota",
                                   code="insufficient_quota")
            used, cost = 0, 0.0
            try:
                async with self.session.post(url, data=json.dumps(payload), headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        # a 200 is paid for: never asked again, whatever its body
                        used = est_tokens
                        try:
                            got = parse_body(raw)
                        except RetryableError as exc:
                            record["teacher"] = {**asked, "error": f"unreadable answer: {exc}"[:300]}
                            raise RequestError(502, f"teacher '{t.name}' sent an answer that is not a chat completion "
                                               f"({str(exc)[:120]})", type_="api_error",
                                               code="teacher_bad_answer") from None
                        text = got["completion"]
                        prompt_tokens, completion_tokens = got["prompt_tokens"] or 0, got["completion_tokens"] or 0
                        used = prompt_tokens + completion_tokens or 1
                        cost = cost_usd(t, prompt_tokens, completion_tokens, got["cached_tokens"])
                        latency_ms = (time.perf_counter() - start) * 1000
                        finish = got["finish_reason"] or "stop"
                        record["teacher"] = {**asked, "answer": text, "finish_reason": finish,
                                             "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                             "cached_tokens": got["cached_tokens"], "cost_usd": cost}
                        if t.logprobs:
                            record["teacher"].update({k: got[k] for k in ("tokens", "token_logprobs", "top_logprobs")})
                        record["teacher_latency_ms"] = latency_ms
                        return {"served_by": "teacher", "text": text, "latency_ms": latency_ms, "finish_reason": finish,
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}
                    last = f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}"
                    if resp.status == 429:
                        self.teacher_ledger.throttle(float(resp.headers.get("Retry-After") or 1))
                    elif resp.status not in (408, 409) and resp.status < 500:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                self.teacher_ledger.settle(est_tokens, used or est_tokens, est_cost, cost, answered=used > 0)
            await asyncio.sleep(0.1 * (attempt + 1))
        record["teacher"] = {**asked, "error": last[:300]}
        raise RequestError(502, f"teacher '{t.name}' failed: {last}", type_="api_error", code="teacher_failed")

    async def _shadow(self, messages, max_tokens: int, temperature: float, category: str, teacher_text: str,
                      record: dict[str, Any]) -> None:
        # in the background: a slow student still gets compared, up to a few budgets
        student = await self._student(messages, max_tokens, temperature,
                                      timeout_s=4 * self.rollout.latency_budget_ms / 1000)
        if student.get("timed_out"):
            student["error"] = f"no answer within {student['latency_ms']:.0f} ms"
        elif student.get("unavailable"):
            student["error"] = "not called: the student kept failing (circuit breaker open)"
        agree = None
        if student.get("error") is None:
            agree = float(self.agreement(student["text"], teacher_text))
            total = self.stats.shadow[category]
            total[0] += agree
            total[1] += 1
            self.metrics.shadow.observe(agree, tags={"category": category})
            if student.get("confidence") is not None:
                self.metrics.confidence.observe(-student["confidence"], tags={"category": category})
                self.stats.slices[category]["confidence"].append(student["confidence"])
        self._plan_outcome(student.get("latency_ms"), error=student.get("error") is not None, agreement=agree)
        record.update({"student_answer": student.get("text"), "student_confidence": student.get("confidence"),
                       "student_latency_ms": student.get("latency_ms"), "student_error": student.get("error"),
                       "shadow_agreement": agree})
        await self._log(record)

    def __del__(self):
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        leases = getattr(self, "teacher_ledger", None)
        if leases is not None:
            # Serve's graceful shutdown: book the teacher usage not yet settled, give back this replica's
            # slots and reserved dollars now (not at lease_ttl_s, in the next step's way), and write the
            # spend to the workdir: a local cluster ending with the app takes the ledger's memory along.
            self.teacher_ledger = None
            leases.close()
            ray.get(leases.ledger.persist.remote(), timeout=10)


def build_app(args: dict[str, Any]):
    """The Serve application (also the import path of a RayService / `serve deploy` config).

    args: what `distill-ray serve` passes ({config: the pipeline config as a dict, student_uri,
    student_name, rollout, token_sha256, admin_sha256}), or, in a Serve config file, {config: a
    config path, overrides: [...]}: the student is then picked as `distill-ray serve` would, and the
    tokens' hashes read on the node from `<serve.auth_token_env>_SHA256` and
    `<serve.admin_token_env>_SHA256` (a RayService mounts only the hashes; see cluster/kuberay)."""
    from distill_ray.config.schema import PipelineConfig

    if isinstance(args.get("config"), str):
        from distill_ray.config import load_config
        from distill_ray.serve.step import app_args, pick_student
        from distill_ray.storage import Workdir

        loaded = load_config(args["config"], list(args.get("overrides") or []))
        name, uri, result = pick_student(loaded, Workdir(loaded.workdir), loaded.serve.mode)
        args = app_args(loaded, name, uri, result)
    config = PipelineConfig.model_validate(args["config"])
    s = config.serve
    if s.num_replicas == "auto":
        options: dict[str, Any] = {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                                          "target_ongoing_requests": 8}}
    else:
        options = {"num_replicas": s.num_replicas}
    if s.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = s.max_replicas_per_node
    if s.engine.backend == "vllm":  # Ray's own LLM deployment (ray.serve.llm) with vLLM's engine
        from distill_ray.serve.student import llm_deployment

        student = llm_deployment(args["student_uri"], args["student_name"], s, options)
    else:
        from distill_ray.engine import ray_options

        actor = ray_options(s.engine)  # the engine's CPUs, GPUs and accelerator type
        if s.student_resources:
            actor["resources"] = dict(s.student_resources)
        student = StudentServer.options(**options, ray_actor_options=actor).bind(
            args["student_uri"], args["student_name"], s.engine.model_dump(mode="json"))
    router: dict[str, Any] = {"user_config": args.get("rollout") or {}, "num_replicas": s.router_replicas}
    if s.router_resources:
        router["ray_actor_options"] = {**Router.ray_actor_options, "resources": dict(s.router_resources)}
    return Router.options(**router).bind(student, args["config"], args["student_name"], args.get("token_sha256"),
                                         args.get("admin_sha256"), args.get("generation", time.time()))
