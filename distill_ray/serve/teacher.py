"""The serve app's teacher: the calls a router makes to the teacher API (shadow answers and
fallbacks), each through the teacher's one ledger (its rate limits and the pipeline's budget_usd,
shared with generate and eval's judge), with what was asked and paid recorded for the request log.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import ray

from distill_ray.config.schema import PipelineConfig
from distill_ray.openai_api import RequestError


class TeacherCaller:
    """One router replica's client of the serve teacher (`serve.teacher`, else the first teacher)."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.teacher = config.fallback_teacher
        self.key = os.environ.get(self.teacher.api_key_env) if self.teacher.api_key_env else None
        self.session = None
        # every fallback and shadow call draws a lease from the ledger and books its cost
        self.ledger = self._open_ledger()

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


    async def ask(self, messages, max_tokens: int, temperature: float, body: dict[str, Any],
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
        headers = auth_headers(t, self.key)
        url = chat_url(t)
        est_tokens, est_cost = estimate_tokens(messages) + max_tokens, cost_usd(t, estimate_tokens(messages), max_tokens)
        last = "no attempt"
        start = time.perf_counter()
        for attempt in range(3):
            try:
                granted = await self.ledger.acquire(est_tokens, est_cost)
            except ray.exceptions.RayError as exc:  # the ledger's node went away: wait for it, or make it anew
                last = f"the teacher's ledger is unreachable ({type(exc).__name__})"
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    self.ledger = self._open_ledger()
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
                        self.ledger.throttle(float(resp.headers.get("Retry-After") or 1))
                    elif resp.status not in (408, 409) and resp.status < 500:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                self.ledger.settle(est_tokens, used or est_tokens, est_cost, cost, answered=used > 0)
            await asyncio.sleep(0.1 * (attempt + 1))
        record["teacher"] = {**asked, "error": last[:300]}
        raise RequestError(502, f"teacher '{t.name}' failed: {last}", type_="api_error", code="teacher_failed")

    def close(self) -> None:
        """Serve's graceful shutdown: book the teacher usage not yet settled, give back this replica's
        slots and reserved dollars now (not at lease_ttl_s, in the next step's way), and write the
        spend to the workdir: a local cluster ending with the app takes the ledger's memory along."""
        leases, self.ledger = self.ledger, None
        if leases is not None:
            leases.close()
            ray.get(leases.ledger.persist.remote(), timeout=10)
