"""Benchmark: can the official `openai` client replace our aiohttp `TeacherClient` without losing speed?

Starts the fake OpenAI-compatible teacher (distill_ray.testing.fake_teacher, its own process, 50 ms latency)
and, in this one process, sends N = max(400, in_flight / 0.05 * 3) chat-completion requests at 8, 32 and
128 requests in flight (an asyncio.Semaphore), each with the body `TeacherClient` sends (model, a system
prompt and a user message, temperature 0, max_tokens 256, logprobs true, top_logprobs 5), through:

  a      bare aiohttp: session.post + await response.read() + json.loads (the ceiling)
  b      our TeacherClient.complete (aiohttp, TCPConnector(limit=0), limiter=None, max_retries=0)
  c      openai.AsyncOpenAI, default httpx2 transport, pool limits raised (1000 connections, 1000 keep-alive)
  d      openai.AsyncOpenAI with DefaultAioHttpClient (the aiohttp transport), same limits
  e-c/d  as c/d but `chat.completions.with_raw_response.create` + our own `parse_body` on the raw bytes
         (skips building the pydantic ChatCompletion)
  f      openai client, aiohttp transport, low-level `client.post("/chat/completions", body=<our dict>,
         cast_to=httpx2.Response)` + `parse_body` (also skips the SDK's per-request TypedDict transform of
         the params, which profiling shows is most of the SDK's CPU per request)

Answers/s comes from the server's ledger: (n - 1) / (last - first) over `answered_timestamps` of one run.
CPU ms/req is this (client) process's time.process_time() per request, which matters because on a
small machine the client's CPU competes with the server's. Each variant is warmed up (connections opened)
before the ledger is reset; variants are run round-robin `--repeats` times and the median is shown.

Run:  .venv/bin/python bench/teacher_client.py            (a few minutes on 2 cores)
      .venv/bin/python bench/teacher_client.py --in-flight 8 32 --repeats 1 --variants a b c
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402

from distill_ray.config.schema import Teacher  # noqa: E402
from distill_ray.teacher.client import TeacherClient, parse_body  # noqa: E402
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig  # noqa: E402

LATENCY_S = 0.05
SYSTEM = "You are a customer-support assistant. Answer with the order number only, or NONE."
HEADERS = {"Content-Type": "application/json"}
LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
VARIANTS = {
    "a": "bare aiohttp",
    "b": "TeacherClient",
    "c": "openai httpx2",
    "d": "openai aiohttp",
    "e-c": "openai httpx2 raw",
    "e-d": "openai aiohttp raw",
    "f": "openai aiohttp post",
}


def body(i: int) -> dict:
    """The request every variant sends (the one TeacherClient sends with the Teacher config below)."""
    return {"model": "fake", "messages": messages(i), "temperature": 0.0, "max_tokens": 256,
            "logprobs": True, "top_logprobs": 5}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Hello, where is my order ORD-1234567? Ticket {i}"}]


class Variant:
    """Holds one client; `call(i)` sends request i and returns the answer text (or raises)."""

    def __init__(self, key: str, teacher: Teacher):
        self.key, self.teacher = key, teacher

    async def __aenter__(self) -> Variant:
        t = self.teacher
        if self.key in ("a", "b"):
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self.client = TeacherClient(t, api_key=None, limiter=None, session=self.session)
        else:
            http = (openai.DefaultAioHttpClient(limits=LIMITS) if self.key[-1] in "df"
                    else openai.DefaultAsyncHttpxClient(limits=LIMITS))
            self.oai = openai.AsyncOpenAI(base_url=t.base_url, api_key="x", max_retries=0, http_client=http)
            self.url = f"{t.base_url}/chat/completions"
        return self

    async def __aexit__(self, *exc) -> None:
        if self.key in ("a", "b"):
            await self.session.close()
        else:
            await self.oai.close()

    async def call(self, i: int) -> str:
        if self.key == "a":
            data = json.dumps(body(i))
            async with self.session.post(self.client.url, data=data, headers=HEADERS) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            return json.loads(raw)["choices"][0]["message"]["content"]
        if self.key == "b":
            answer = await self.client.complete(messages(i))
            if answer.error:
                raise RuntimeError(answer.error)
            return answer.completion
        if self.key == "f":
            response = await self.oai.post("/chat/completions", body=body(i),
                                           cast_to=httpx2.Response)
            return parse_body(response.content)["completion"]
        if self.key.startswith("e"):
            raw = await self.oai.chat.completions.with_raw_response.create(**body(i))
            return parse_body(raw.content)["completion"]
        completion = await self.oai.chat.completions.create(**body(i))
        return completion.choices[0].message.content


def check_same_body(teacher_cfg: Teacher) -> None:
    """Assert TeacherClient builds exactly `body(i)` (module function in newer client.py, method in older)."""
    from distill_ray.teacher import client as client_module
    if hasattr(client_module, "request_body"):
        ours = client_module.request_body(teacher_cfg, messages(5), 0)
    else:
        ours = TeacherClient(teacher_cfg, None, None, None).request_body(messages(5), 0)
    assert ours == body(5), f"TeacherClient sends {ours}, the bench sends {body(5)}"


async def drive(variant: Variant, in_flight: int, n: int, offset: int) -> int:
    sem = asyncio.Semaphore(in_flight)
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            try:
                if await variant.call(offset + i) != "ORD-123456":
                    errors += 1
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return errors


async def measure(key: str, teacher_cfg: Teacher, fake: FakeTeacher, in_flight: int, n: int) -> dict:
    async with Variant(key, teacher_cfg) as variant:
        await drive(variant, in_flight, max(2 * in_flight, 64), offset=10_000_000)  # open + warm connections
        await asyncio.to_thread(fake.reset)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        errors = await drive(variant, in_flight, n, offset=0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    stamps = (await asyncio.to_thread(fake.stats))["answered_timestamps"]
    server_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"rate": server_rate, "client_rate": n / wall, "cpu_ms": 1000 * cpu / n, "errors": errors,
            "answered": len(stamps)}


async def main_async(args) -> None:
    versions = {m.__name__: m.__version__ for m in (openai, httpx2, httpx, aiohttp)}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), f"| python {sys.version.split()[0]}")
    print("openai's default transport is httpx2 (not httpx); DefaultAioHttpClient =",
          openai.DefaultAioHttpClient.__mro__[1].__module__)
    with FakeTeacher(FakeTeacherConfig(latency_s=LATENCY_S)) as fake:
        teacher_cfg = Teacher(name="t", base_url=fake.base_url, model="fake", max_retries=0)
        check_same_body(teacher_cfg)
        results: dict[tuple[int, str], list[dict]] = {}
        for in_flight in args.in_flight:
            n = max(400, int(in_flight / LATENCY_S * 3))
            for rep in range(args.repeats):
                for key in args.variants:
                    r = await measure(key, teacher_cfg, fake, in_flight, n)
                    results.setdefault((in_flight, key), []).append(r)
                    print(f"  in_flight={in_flight:<4} n={n:<5} rep={rep} {key:<4} {VARIANTS[key]:<19} "
                          f"server {r['rate']:7.0f}/s  client {r['client_rate']:7.0f}/s  "
                          f"cpu {r['cpu_ms']:.3f} ms/req  errors {r['errors']}", flush=True)

    def med(in_flight, key, field):
        return statistics.median(r[field] for r in results[(in_flight, key)])

    print(f"\nanswers/s (server ledger, median of {args.repeats}); ratio to (a); "
          f"client CPU s per 1000 requests; ideal = in_flight / {LATENCY_S}s")
    header = f"{'in-flight':>9} {'ideal':>6} | " + " | ".join(f"{k + ' ' + VARIANTS[k]:>24}" for k in args.variants)
    print(header)
    print("-" * len(header))
    for in_flight in args.in_flight:
        base = med(in_flight, "a", "rate") if "a" in args.variants else None
        cells = []
        for key in args.variants:
            rate = med(in_flight, key, "rate")
            ratio = f"{rate / base:.2f}x" if base else "  -  "
            cells.append(f"{rate:7.0f}/s {ratio:>5} {med(in_flight, key, 'cpu_ms'):5.2f}cpu")
        print(f"{in_flight:>9} {in_flight / LATENCY_S:6.0f} | " + " | ".join(f"{c:>24}" for c in cells))
    errs = sum(r["errors"] for rs in results.values() for r in rs)
    print(f"(cpu = client CPU seconds per 1000 requests; errors across all runs: {errs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
