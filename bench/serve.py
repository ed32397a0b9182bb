"""Serving: the student engine (vLLM against the transformers generator it replaces), then the
router's overhead, in one run.

    .venv/bin/python bench/serve.py                 # both parts
    .venv/bin/python bench/serve.py --part engines  # vLLM vs transformers only
    .venv/bin/python bench/serve.py --part overhead --requests 1000

Part 1, engines: the example's `base` student (SmolLM2-135M-Instruct, the offline wheel) served by
`distill-ray serve` in `full` mode with serve.engine.backend vllm (bf16, eager) and then transformers
(fp32), each replica with one CPU, measured through the router with the same requests: p50/p95
latency at 1 and 8 clients, requests/s at 32 clients (the example's extraction prompts, max_tokens 16),
and, streamed, the time to the first content chunk against the whole answer's time at max_tokens 64
(an open prompt that runs the full 64 tokens).

Part 2, overhead: p50/p99 of a request through the router (HTTP, auth, routing, the safety net,
metrics, request log) against calling the student deployment's handle directly, in the same run.

The student is a tiny Llama (a few ms per answer) so that the router's cost is what shows; the mode
is `full` with no confidence floor, so every routed request is answered by the student. All paths
run one request at a time, round-robin, on one local Ray, over one keep-alive HTTP connection (as
the `openai` client keeps one).

What the router adds is split in two, measured in the same run:
- Ray Serve's own cost of the design (HTTP proxy -> ingress replica, which fetches the POST body back
  from the proxy -> a second deployment): a no-op ingress that reads the same body and forwards to a
  no-op deployment, against that no-op deployment's handle;
- the router's own work (parsing, auth, policy, safety net, metrics, log, response): the router's
  time minus its waits for the body and the student, timed inside the router; every request log
  line carries it as `router_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def floor_app():
    """The cheapest app of the same shape: an HTTP ingress that reads a POST body and awaits a second
    deployment."""
    from ray import serve

    @serve.deployment(name="noop", ray_actor_options={"num_cpus": 0})
    class Noop:
        async def generate(self) -> dict:
            return {"text": "ok"}

    @serve.deployment(name="noop_ingress", ray_actor_options={"num_cpus": 0})
    class NoopIngress:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, request) -> dict:
            json.loads(await request.body())
            return await self.inner.generate.remote()

    return NoopIngress.bind(Noop.bind())


EXTRACT = "Extract the order number from the customer's message. Reply with the order number only, or NONE."
MESSAGES = ["Hi, where is my order ORD-512874? It was due Monday.", "My card was declined, can you help?",
            "I returned the blender (ORD-730215) but got no refund yet.", "Do you ship to Canada?",
            "any news on ORD-268193? tracking hasn't moved", "How do I change my email address?",
            "Package ORD-994120 arrived damaged, the box was crushed.", "I was charged twice for ORD-118302!"]
OPEN_PROMPT = [{"role": "user", "content": "Write a long, friendly letter to a customer whose parcel was lost."}]


async def _clients(url: str, headers: dict, bodies: list[dict], clients: int) -> tuple[list[float], float]:
    """Send the bodies with `clients` in flight; per-request latencies (ms) and requests/s."""
    import aiohttp

    queue, latencies = list(bodies), []

    async def client(session):
        while queue:
            body = queue.pop()
            t = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200 and resp.headers["x-served-by"] == "student", resp.headers
            latencies.append((time.perf_counter() - t) * 1000)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return latencies, len(bodies) / (time.perf_counter() - t0)


async def _stream(url: str, headers: dict, max_tokens: int) -> tuple[float, float, int]:
    """One streamed request: ms to the first content chunk, ms to the end, content chunks."""
    import aiohttp

    body = {"model": "m", "messages": OPEN_PROMPT, "max_tokens": max_tokens, "stream": True}
    first, chunks = None, 0
    async with aiohttp.ClientSession() as session:
        t = time.perf_counter()
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.headers["x-served-by"] == "student", resp.headers
            async for line in resp.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    chunks += 1
                    first = first or (time.perf_counter() - t) * 1000
        return first, (time.perf_counter() - t) * 1000, chunks


def engines(rounds: int) -> list[dict]:
    """Part 1: the example's base student through the router on each backend."""
    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.manifest import StepRecord, write_manifest
    from distill_ray.models import smollm2_dir
    from distill_ray.serve.step import deploy
    from distill_ray.storage import Workdir

    os.environ["DISTILL_BENCH_SERVE_TOKEN"] = "bench-token"
    headers = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}
    extract = [{"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": EXTRACT},
                                                              {"role": "user", "content": m}]} for m in MESSAGES]
    results = []
    port = _free_port()  # one for both apps: Serve's HTTP proxy keeps the port it started with
    ray.init(num_cpus=2, logging_level="ERROR")
    try:
        for backend in ("vllm", "transformers"):
            with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
                workdir = Path(tmp) / "run"
                (workdir / "students" / "base").mkdir(parents=True)
                os.symlink(smollm2_dir(), workdir / "students" / "base" / "best")
                write_manifest(Workdir(str(workdir)), StepRecord("students/base", {}, {}))
                config = load_config(None, [
                    f"workdir={workdir}", "teachers.0.base_url=http://127.0.0.1:9/v1", "teachers.0.launch=null",
                    "students=[{name: base, base_model: smollm2}]", "serve.student=base", f"serve.port={port}",
                    "serve.auth_token_env=DISTILL_BENCH_SERVE_TOKEN", "serve.mode=full", "serve.min_confidence=-1000",
                    "serve.latency_budget_ms=600000", f"serve.engine.backend={backend}"])
                t = time.perf_counter()
                deploy(config, echo=lambda _: None)
                start_s = time.perf_counter() - t
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                asyncio.run(_clients(url, headers, extract, 4))  # warm-up
                one, _ = asyncio.run(_clients(url, headers, extract * rounds, 1))
                eight, _ = asyncio.run(_clients(url, headers, extract * rounds * 4, 8))
                _, rps32 = asyncio.run(_clients(url, headers, extract * rounds * 8, 32))
                streams = [asyncio.run(_stream(url, headers, 64)) for _ in range(max(3, rounds))]
                results.append({"backend": backend, "start_s": start_s, "p50_1": pct(one, 50), "p95_1": pct(one, 95),
                                "p50_8": pct(eight, 50), "p95_8": pct(eight, 95), "rps_32": rps32,
                                "first_ms": pct([s[0] for s in streams], 50), "whole_ms": pct([s[1] for s in streams], 50),
                                "chunks": pct([s[2] for s in streams], 50)})
                serve.delete("distill")
                print(f"  {backend}: {results[-1]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    v, t = results
    print(f"\nstudent engines through the router: SmolLM2-135M-Instruct, one replica with 1 CPU each, "
          f"{os.cpu_count()} cores, {len(MESSAGES) * rounds} requests at 1 client")
    print(f"  {'':34}{'vLLM (bf16)':>16}{'transformers (fp32)':>22}{'ratio':>8}")
    rows = [("replica start, s", "start_s", False), ("p50 ms, 1 client", "p50_1", False), ("p95 ms, 1 client", "p95_1", False),
            ("p50 ms, 8 clients", "p50_8", False), ("p95 ms, 8 clients", "p95_8", False),
            ("requests/s, 32 clients", "rps_32", True), ("stream: first chunk ms (64 tok)", "first_ms", False),
            ("stream: whole answer ms", "whole_ms", False), ("stream: content chunks", "chunks", True)]
    for label, key, higher_better in rows:
        ratio = v[key] / t[key] if higher_better else t[key] / v[key]
        print(f"  {label:34}{v[key]:>16.1f}{t[key]:>22.1f}{ratio:>7.2f}x")
    print(f"  vLLM first chunk / whole answer: {v['first_ms'] / v['whole_ms']:.3f} (aim <= 1/3)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="engines part: the 8 prompts this many times at 1 client")
    parser.add_argument("--part", choices=["all", "engines", "overhead"], default="all")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    if args.part in ("all", "engines"):
        engines(args.rounds)
    if args.part == "engines":
        return

    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.serve.logs import read_logs
    from distill_ray.serve.step import deploy
    from distill_ray.storage import Workdir
    from distill_ray.testing.tiny_models import save_finished_student as _student

    os.environ["DISTILL_BENCH_SERVE_TOKEN"] = "bench-token"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp) / "run"
        _student(workdir)
        port = _free_port()
        config = load_config(None, [
            f"workdir={workdir}", "teachers.0.base_url=http://127.0.0.1:9/v1", "teachers.0.launch=null",
            "students=[{name: mini, base_model: unused}]", "serve.student=mini", f"serve.port={port}",
            "serve.auth_token_env=DISTILL_BENCH_SERVE_TOKEN", "serve.mode=full", "serve.min_confidence=-1000"])
        ray.init(num_cpus=2, logging_level="ERROR")
        try:
            deploy(config, echo=print)
            serve.run(floor_app(), name="floor", route_prefix="/floor", blocking=False)
            student = serve.get_deployment_handle("student", app_name="distill")
            noop = serve.get_deployment_handle("noop", app_name="floor")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            messages = [{"role": "user", "content": "Where is ORD-512874?"}]
            body = json.dumps({"model": "m", "messages": messages, "max_tokens": 4})
            headers = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}

            def timed(call) -> float:
                t = time.perf_counter()
                call()
                return (time.perf_counter() - t) * 1000

            def routed() -> None:
                conn.request("POST", "/v1/chat/completions", body, headers)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200 and resp.headers["x-served-by"] == "student", resp.headers

            def floor_http() -> None:
                conn.request("POST", "/floor", body, headers)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200

            from distill_ray.serve.student import StudentClient

            client, loop = StudentClient(student, "mini", ray_llm=True), asyncio.new_event_loop()
            paths = {"router": routed,
                     "student handle": lambda: loop.run_until_complete(client.generate(messages, 4, 0.0)),
                     "no-op ingress -> no-op": floor_http, "no-op handle": lambda: noop.generate.remote().result()}
            for _ in range(20):  # warm-up: the connection, the handles' routing tables, the model
                for call in paths.values():
                    call()
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.requests):
                for name, call in paths.items():
                    times[name].append(timed(call))
            time.sleep(2.5)  # the request log's writer flushes every second
            own = [r["router_ms"] for r in read_logs(Workdir(str(workdir))) if r.get("router_ms") is not None]
        finally:
            serve.shutdown()
            ray.shutdown()

    def line(name: str) -> str:
        v = times[name]
        return f"p50 {pct(v, 50):7.2f} ms   p99 {pct(v, 99):7.2f} ms"

    r, d, fh, fd = (times[n] for n in paths)
    print(f"\nserving overhead, {args.requests} requests per path, one at a time, round-robin, tiny student, "
          f"{os.cpu_count()} cores")
    print(f"  through the router (HTTP + auth + routing + safety net + metrics + log): {line('router')}")
    print(f"  student deployment handle directly:                                      {line('student handle')}")
    print(f"  => added by going through the router:  p50 {pct(r, 50) - pct(d, 50):6.2f} ms   "
          f"p99 {pct(r, 99) - pct(d, 99):6.2f} ms")
    print("  of which Ray Serve's cost of the shape (HTTP proxy + ingress replica + body fetch + one more hop):")
    print(f"    no-op HTTP ingress -> no-op deployment:                                {line('no-op ingress -> no-op')}")
    print(f"    no-op deployment handle directly:                                      {line('no-op handle')}")
    print(f"    => added by the shape alone:         p50 {pct(fh, 50) - pct(fd, 50):6.2f} ms   "
          f"p99 {pct(fh, 99) - pct(fd, 99):6.2f} ms")
    print(f"  and the router's own work (its time minus its waits for the body and the student; "
          f"`router_ms` of {len(own)} logged requests): p50 {pct(own, 50):.2f} ms   p99 {pct(own, 99):.2f} ms")


if __name__ == "__main__":
    main()
