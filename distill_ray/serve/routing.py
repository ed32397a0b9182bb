"""Who answers a request, carried out: the student and/or the teacher per the live rollout, the
fallback to the teacher when the student is unsure, slow or failing, and shadow mode's background
comparison. The rules themselves are `policy.py`'s; the HTTP side is `router.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from distill_ray.chat import few_shot_turns, strip_few_shot
from distill_ray.config.schema import PipelineConfig, Rollout
from distill_ray.openai_api import RequestError
from distill_ray.serve.control import RolloutClient
from distill_ray.serve.metrics import Metrics, Stats
from distill_ray.serve.policy import Breaker, fallback_reason, student_answers
from distill_ray.serve.teacher import TeacherCaller


class Routing:
    """One router replica's answering: the student client, the teacher caller, the student's
    circuit breaker; counts into `stats` and `metrics`, outcomes into the rollout client."""

    def __init__(self, config: PipelineConfig, student: Any, teacher: TeacherCaller, control: RolloutClient,
                 metrics: Metrics, stats: Stats, log: Callable[[dict[str, Any]], Awaitable[None]]):
        from distill_ray.metrics import metric

        s = config.serve
        self.student, self.teacher, self.control = student, teacher, control
        self.metrics, self.stats, self.log = metrics, stats, log
        self.breaker = Breaker(s.breaker_failures, s.breaker_cooldown_s)
        self.judge_tokens = s.stream_judge_tokens
        self.salt = config.name
        self.agreement = metric(config.task.string_metric, config.task.metric_pattern)
        self.few_shot = few_shot_turns(config.task)
        self.background: set[asyncio.Task] = set()

    async def answer(self, body, rollout: Rollout, user_key: str, category: str, max_tokens: int, temperature: float,
                      record: dict[str, Any]) -> dict[str, Any]:
        messages = body["messages"]
        if rollout.mode == "shadow":
            teacher = await self.teacher.ask(messages, max_tokens, temperature, body, record)
            task = asyncio.get_running_loop().create_task(
                self._shadow(messages, max_tokens, temperature, category, teacher["text"], record))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return {**teacher, "waited_ms": teacher["latency_ms"]}
        if not student_answers(rollout, user_key, self.salt):
            teacher = await self.teacher.ask(messages, max_tokens, temperature, body, record)
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
            teacher = await self.teacher.ask(messages, max_tokens, temperature, body, record)
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
                    if len(logprobs) >= self.judge_tokens:
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


    async def _shadow(self, messages, max_tokens: int, temperature: float, category: str, teacher_text: str,
                      record: dict[str, Any]) -> None:
        # in the background: a slow student still gets compared, up to a few budgets
        student = await self._student(messages, max_tokens, temperature,
                                      timeout_s=4 * self.control.rollout.latency_budget_ms / 1000)
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
        self.control.outcome(student.get("latency_ms"), error=student.get("error") is not None, agreement=agree)
        record.update({"student_answer": student.get("text"), "student_confidence": student.get("confidence"),
                       "student_latency_ms": student.get("latency_ms"), "student_error": student.get("error"),
                       "shadow_agreement": agree})
        await self.log(record)
