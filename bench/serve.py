"""Serving overhead: p50/p99 of a request through the router (HTTP, auth, routing, the safety net,
metrics, request log) against calling the student deployment's handle directly, in the same run.

    .venv/bin/python bench/serve.py                 # 300 requests each, interleaved
    .venv/bin/python bench/serve.py --requests 1000

The student is a tiny Llama (a few ms per answer) so that the router's own cost is what shows; the
mode is `full` with no confidence floor, so every routed request is answered by the student. Both
paths run one request at a time, alternating, on a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.serve.step import deploy
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
            handle = serve.get_deployment_handle("student", app_name="distill")
            messages = [{"role": "user", "content": "Where is ORD-512874?"}]
            body = json.dumps({"model": "m", "messages": messages, "max_tokens": 4}).encode()

            def routed() -> float:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={
                    "Authorization": "Bearer bench-token", "Content-Type": "application/json"})
                t = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as resp:
                    assert resp.headers["x-served-by"] == "student", resp.headers
                    resp.read()
                return (time.perf_counter() - t) * 1000

            def direct() -> float:
                t = time.perf_counter()
                handle.generate.remote(messages, 4, 0.0).result()
                return (time.perf_counter() - t) * 1000

            for _ in range(20):  # warm-up: connections, the handle's routing table, the model
                routed(), direct()
            r, d = [], []
            for _ in range(args.requests):
                r.append(routed())
                d.append(direct())
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"serving overhead, {args.requests} requests each, one at a time, tiny student, {os.cpu_count()} cores")
    print(f"  through the router (HTTP + auth + routing + safety net + log): p50 {pct(r, 50):.2f} ms, "
          f"p99 {pct(r, 99):.2f} ms, mean {statistics.mean(r):.2f} ms")
    print(f"  student handle directly:                                      p50 {pct(d, 50):.2f} ms, "
          f"p99 {pct(d, 99):.2f} ms, mean {statistics.mean(d):.2f} ms")
    print(f"  added by the router: p50 {pct(r, 50) - pct(d, 50):.2f} ms, p99 {pct(r, 99) - pct(d, 99):.2f} ms")


if __name__ == "__main__":
    main()
