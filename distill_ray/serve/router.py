"""The serve app's HTTP ingress (`Router`): OpenAI's `/v1/chat/completions` (plain and streaming SSE)
and `/v1/models`, the control endpoints `/v1/distill/stats` and `/v1/distill/rollout`, `/health`.

Per request it checks the token and the body (`chat_request.py`), has `routing.py` answer, says who
answered in `x-served-by` (and why not the student in `x-fallback-reason`), counts (`metrics.py`)
and logs (`logs.py`). The live rollout comes from the control actor (`control.py`), synced every
POLL_S; `reconfigure` takes a Serve config update of the deployment's `user_config`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import ray
from ray import serve

from distill_ray.chat import strip_few_shot
from distill_ray.config.schema import Rollout
from distill_ray.openai_api import SSE_DONE, RequestError, completion_body, sse_chunks, sse_event
from distill_ray.serve.chat_request import ORIGIN, REQUEST_ID, authorize, parse_chat_request, read_body
from distill_ray.serve.control import POLL_S, RolloutClient
from distill_ray.serve.metrics import GAUGE_EVERY_S, Metrics, Stats
from distill_ray.serve.routing import Routing


@serve.deployment(name="router", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000)
class Router:
    """The OpenAI-compatible ingress: routing, fallback, auth, limits, metrics, request logs."""

    def __init__(self, student: Any, config_json: dict[str, Any], student_name: str, token_sha256: str | None = None,
                 admin_sha256: str | None = None, generation: float = 0.0):
        from distill_ray.config.schema import PipelineConfig
        from distill_ray.serve.deployment import configured_rollout, known_categories, student_gate
        from distill_ray.serve.logs import RequestLog
        from distill_ray.serve.student import StudentClient
        from distill_ray.serve.teacher import TeacherCaller
        from distill_ray.storage import Workdir

        self.config = PipelineConfig.model_validate(config_json)
        s = self.config.serve
        if (token_sha256 is None or admin_sha256 is None) and not s.allow_open_endpoint:
            raise ValueError("serve: the router needs the API token's and the admin token's hashes "
                             "(serve.auth_token_env, serve.admin_token_env), or serve.allow_open_endpoint: true")
        self.student_name = student_name
        workdir = Workdir(self.config.workdir)
        # The tokens' SHA-256, computed where `distill-ray serve` read serve.auth_token_env and
        # serve.admin_token_env: the tokens themselves never travel to the cluster nor sit in a config.
        self.token_sha256, self.admin_sha256 = token_sha256, admin_sha256
        self.categories = set(s.categories if s.categories is not None else known_categories(workdir))
        # The eval gate, judged here from the workdir: no client of the control endpoint can skip it.
        self.gate = student_gate(self.config, workdir, student_name)
        rollout = configured_rollout(s)
        self._check_gate(rollout)
        plan = [stage.model_dump(mode="json") for stage in s.rollout_plan] if s.rollout_plan else None
        self.control = RolloutClient({
            "rollout": rollout.model_dump(), "plan": plan, "guardrails": s.guardrails.model_dump(),
            "gate": {"passed": self.gate[0], "reason": self.gate[1]}, "workdir": self.config.workdir,
            "student": student_name, "generation": generation})
        self.poller: asyncio.Task | None = None
        self.log = RequestLog(workdir, batch_size=s.log_batch_size, flush_s=s.log_flush_s,
                              max_queued=s.log_queue_max, block_s=s.log_block_s)
        self.metrics = Metrics()
        self.stats = Stats()
        self.teacher_caller = TeacherCaller(self.config)
        self.teacher = self.teacher_caller.teacher
        # Ray's LLM deployment (backend vllm) or distill-ray's StudentServer (backend transformers)
        self.routing = Routing(self.config, StudentClient(student, student_name, ray_llm=s.engine.backend == "vllm"),
                               self.teacher_caller, self.control, self.metrics, self.stats, self._log)

    @property
    def rollout(self) -> Rollout:
        return self.control.rollout

    def _check_gate(self, rollout: Rollout) -> None:
        if rollout.mode != "shadow" and not self.gate[0]:
            raise RequestError(409, f"student '{self.student_name}' may not answer clients in {rollout.mode} mode: "
                               f"{self.gate[1]}", code="eval_gate")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A Serve config update of the router's user_config (e.g. a RayService): the new rollout,
        for every replica, through the control actor; a bad one fails the update, visibly."""
        if user_config:
            self._check_gate(Rollout.model_validate({**self.rollout.model_dump(), **user_config}))
        if self.control.apply_config(user_config):
            self._gauge_rollout()

    def _gauge_rollout(self) -> None:
        r = self.rollout
        self.metrics.canary.set({"shadow": 0.0, "canary": r.canary_percent, "full": 100.0}[r.mode])

    async def _poll(self) -> None:
        gauged = 0.0
        while True:
            if await self.control.sync() or time.monotonic() - gauged > GAUGE_EVERY_S:
                self._gauge_rollout()
                gauged = time.monotonic()
            await asyncio.sleep(POLL_S)

    # ------------------------------------------------------------------------------------------ HTTP
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self.poller is None:
            self.poller = asyncio.get_running_loop().create_task(self._poll())
        path, method = request.url.path.rstrip("/"), request.method
        # Serve's own request id (its proxy sets one, or keeps the client's, and sends it back as x-request-id)
        serve_id = request.headers.get("x-request-id") or ""
        record: dict[str, Any] = {"request_id": serve_id if REQUEST_ID.match(serve_id) else uuid.uuid4().hex[:24],
                                  "time": time.time()}
        try:
            if path.endswith("/health"):
                return JSONResponse({"status": "ok"})
            if "/v1/distill/" in path:  # the control endpoints: the admin token only
                self._authorize(request.headers.get("authorization"), admin=True)
                if path.endswith("/v1/distill/stats") and method == "GET":
                    return JSONResponse(self._stats_body())
                if path.endswith("/v1/distill/rollout") and method == "POST":
                    return JSONResponse(await self._set_rollout(await read_body(request, self.config.serve.max_request_bytes)))
                raise RequestError(404, f"no route {method} {request.url.path}", code="not_found")
            admin = self._authorize(request.headers.get("authorization"))
            if path.endswith("/v1/models") and method == "GET":
                return JSONResponse(self._models())
            if path.endswith("/v1/chat/completions") and method == "POST":
                # x-distill-origin tags traffic that is not clients' (the replayed holdout): drift compares it
                # with its own reference, the flywheel leaves it out; so only an admin may set it
                origin = request.headers.get("x-distill-origin") if admin else None
                record["origin"] = origin if origin and ORIGIN.match(origin) else None
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
                self.control.outcome(record.get("student_latency_ms") or 0.0, fallback=True, error=True)
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
        return authorize(header, self.token_sha256, self.admin_sha256, admin)

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
                raise ValueError(f"send a JSON object with {', '.join(Rollout.model_fields)} and/or plan")
            if "plan" in changes:
                if set(changes) != {"plan"}:
                    raise ValueError("'plan' goes alone")
                previous = self.rollout.model_dump()
                await self.control.plan_command(changes["plan"])
                return {"rollout": self.rollout.model_dump(), "previous": previous, "plan": self.control.plan_status}
            wanted = Rollout.model_validate({**self.rollout.model_dump(), **changes})
        except (ValueError, TypeError, ray.exceptions.RayTaskError) as exc:
            message = str(exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc).splitlines()
            raise RequestError(400, "rollout: " + "; ".join(line.strip() for line in message if line.strip()
                                                            and "errors.pydantic.dev" not in line)) from None
        from distill_ray.serve.deployment import student_gate
        from distill_ray.storage import Workdir

        self.gate = student_gate(self.config, Workdir(self.config.workdir), self.student_name)  # as eval stands now
        self._check_gate(wanted)
        previous = self.rollout.model_dump()
        if await self.control.set(changes):
            self._gauge_rollout()
        return {"rollout": self.rollout.model_dump(), "previous": previous, "plan": self.control.plan_status}

    def _stats_body(self) -> dict[str, Any]:
        return {"student": self.student_name, "teacher": self.teacher.name, "rollout": self.rollout.model_dump(),
                "plan": self.control.plan_status, "eval_gate": {"passed": self.gate[0], "reason": self.gate[1]},
                "student_breaker": {"state": self.routing.breaker.state, "opened": self.routing.breaker.opened},
                "request_log": self.log.stats(), **self.stats.snapshot()}

    def _category(self, request, metadata: dict[str, Any]) -> str:
        sent = request.headers.get("x-category") or metadata.get("category")
        if not sent:
            return "unknown"
        return sent if isinstance(sent, str) and sent in self.categories else "other"

    async def _chat(self, request, record: dict[str, Any]):
        from starlette.responses import JSONResponse, StreamingResponse

        t0 = time.perf_counter()
        s = self.config.serve
        raw = await read_body(request, s.max_request_bytes)  # Serve fetches the body from its HTTP proxy: a wait, not our work
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
                       "prompt": [m for m in strip_few_shot(body["messages"], self.routing.few_shot) if m["role"] != "system"]})
        answer = await self.routing.answer(body, rollout, user or request_id, category, max_tokens, temperature, record)
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
            return StreamingResponse(sse_chunks(f"chatcmpl-{request_id}", model, answer["text"], answer["finish_reason"]),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(completion_body(f"chatcmpl-{request_id}", model, answer["text"], answer["usage"], answer["finish_reason"]),
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
            self.control.outcome(latency_ms, fallback=reason is not None,
                               error=reason in ("student_error", "student_unavailable") or bool(answer.get("error")))
        if rollout.mode != "shadow":
            await self._log(record)  # in shadow mode the background comparison logs the line, with both answers

    async def _live_sse(self, answer: dict[str, Any], request_id: str, model: str, t0: float, body_ms: float,
                        rollout: Rollout, record: dict[str, Any]):
        """SSE events of a student stream: the judged first tokens at once, then each piece as it arrives."""
        created = int(time.time())
        live = answer.pop("live")

        def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return sse_event(f"chatcmpl-{request_id}", model, created, delta, finish_reason)

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
            yield SSE_DONE
        except Exception as exc:  # noqa: BLE001 - the replica died mid-stream: the client gets what was sent
            answer["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            record["student_error"] = answer["error"]
            self.routing.breaker.record(ok=False)
            yield event({}, "error")
        finally:
            live.cancel()
            answer.update({"text": text.strip(), "waited_ms": (time.perf_counter() - t0) * 1000 - body_ms})
            await self._finish(record, answer, rollout, t0, body_ms)


    def __del__(self):
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        caller = getattr(self, "teacher_caller", None)
        if caller is not None:
            caller.close()
