"""Serving overhead: p50/p99 of a request through the router (HTTP, auth, routing, the safety net,
metrics, request log) against calling the student deployment's handle directly, in the same run.

    .venv/bin/python bench/serve.py                 # 300 requests per path, interleaved
    .venv/bin/python bench/serve.py --requests 1000

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.serve.logs import read_logs
    from distill_ray.serve.step import deploy
    from distill_ray.storage import Workdir
    from tests.integration.test_serve import _student

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

            paths = {"router": routed, "student handle": lambda: student.generate.remote(messages, 4, 0.0).result(),
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
