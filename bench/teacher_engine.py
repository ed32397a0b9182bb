"""The offline teacher's two engines side by side: vLLM's OpenAI server against distill-ray's transformers server.

    .venv/bin/python bench/teacher_engine.py              # vLLM eager (the CPU default)
    .venv/bin/python bench/teacher_engine.py --compile    # vLLM with torch.compile (slower start)

The same 200 messages of jobs/data/support_orders.jsonl (unparseable lines skipped), sent as the
example config (jobs/configs/support_orders.yaml) sends them: its system line and few-shot turns, then
the message; max_tokens 16, temperature 0, logprobs with top_logprobs 5, the model name the teacher
serves (SmolLM2-135M-Instruct). Each server is started the way `teachers[].launch` starts it
(`distill_ray.teacher.launch`, `engine.backend` vllm, then transformers), on a free port, measured,
and stopped before the other starts:

- start-up: from the start to /health answering;
- answers/s and p50 latency with 1, 16 and 64 clients in flight (1 client: 32 requests; otherwise
  4 x clients, at least 64, at most 200), after one warm-up request;
- how many of the 200 answers (the 64-client run) are identical between the two, and how many are
  right on the messages with an agent's order_id label.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_ray.chat import teacher_messages  # noqa: E402
from distill_ray.config import load_config  # noqa: E402
from distill_ray.config.schema import Engine, Teacher  # noqa: E402
from distill_ray.teacher.launch import Launched  # noqa: E402

CONFIG = ROOT / "jobs/configs/support_orders.yaml"
DATA = ROOT / "jobs/data/support_orders.jsonl"
MODEL = "SmolLM2-135M-Instruct"
CLIENTS = (1, 16, 64)


def requests_for(clients: int) -> int:
    return 32 if clients == 1 else min(200, max(64, 4 * clients))


def load_messages(n: int) -> list[tuple[list[dict[str, str]], str | None]]:
    """(chat, order_id label) for the first n parseable rows, as the example's teacher is asked."""
    task = load_config(str(CONFIG)).task
    rows = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                continue
            rows.append((teacher_messages(task, [{"role": "user", "content": row["text"]}]), row.get("order_id")))
            if len(rows) == n:
                break
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def ask(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]) -> tuple[str, float]:
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True,
            "top_logprobs": 5}
    start = time.perf_counter()
    async with session.post(url, json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload}")
    choice = payload["choices"][0]
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 5
    return choice["message"]["content"], time.perf_counter() - start


async def run_clients(url: str, chats: list[list[dict[str, str]]], clients: int) -> tuple[float, float, list[str]]:
    """answers/s, p50 ms and the answers, with `clients` requests in flight until all are answered."""
    answers: list[str] = [""] * len(chats)
    latencies: list[float] = []
    queue = list(range(len(chats)))[::-1]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        await ask(session, url, chats[0])  # warm-up (connection, the shared prefix)

        async def client() -> None:
            while queue:
                i = queue.pop()
                answers[i], seconds = await ask(session, url, chats[i])
                latencies.append(seconds)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return len(chats) / wall, statistics.median(latencies) * 1000, answers


def measure(backend: str, engine: Engine, chats: list[list[dict[str, str]]]) -> dict:
    port = free_port()
    teacher = Teacher(name=f"bench-{backend}", base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, launch="smollm2",
                      engine=engine)
    launched = Launched(echo=lambda line: print(f"  {line}", flush=True))
    start = time.perf_counter()
    launched.start(teacher)
    try:
        launched.wait()
        result = {"startup_s": time.perf_counter() - start, "runs": {}}
        for clients in CLIENTS:
            n = requests_for(clients)
            rate, p50, answers = asyncio.run(run_clients(f"{teacher.base_url}/chat/completions", chats[:n], clients))
            result["runs"][clients] = (rate, p50, answers)
            print(f"  {backend}: {clients:>2} clients, {n} requests: {rate:.2f} answers/s, p50 {p50:.0f} ms", flush=True)
    finally:
        launched.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="vLLM without --enforce-eager (torch.compile)")
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = load_messages(args.messages)
    chats = [chat for chat, _ in rows]
    print(f"{len(chats)} messages from {DATA.relative_to(ROOT)}, {len(chats[0]) - 1} system/few-shot messages "
          f"each; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    vllm_engine = Engine(enforce_eager=not args.compile)
    results = {}
    for backend, engine in (("vllm", vllm_engine), ("transformers", Engine(backend="transformers"))):
        print(f"{backend}: starting", flush=True)
        results[backend] = measure(backend, engine, chats)
    v, t = results["vllm"], results["transformers"]
    mode = "compiled" if args.compile else "eager"
    print(f"\n| clients in flight | vLLM ({mode}, bf16) answers/s | transformers (fp32) answers/s | ratio |")
    print("| --- | --- | --- | --- |")
    for clients in CLIENTS:
        (vr, vp, _), (tr, tp, _) = v["runs"][clients], t["runs"][clients]
        print(f"| {clients} | {vr:.2f} (p50 {vp:.0f} ms) | {tr:.2f} (p50 {tp:.0f} ms) | {vr / tr:.1f} |")
    print(f"\nstart-up: vLLM {v['startup_s']:.0f} s, transformers {t['startup_s']:.0f} s")
    va, ta = v["runs"][CLIENTS[-1]][2], t["runs"][CLIENTS[-1]][2]
    same = sum(a == b for a, b in zip(va, ta, strict=True))
    labelled = [(i, label.upper()) for i, (_, label) in enumerate(rows[:len(va)]) if isinstance(label, str)]
    right_v = sum(va[i].strip().strip(".").upper() == label for i, label in labelled)
    right_t = sum(ta[i].strip().strip(".").upper() == label for i, label in labelled)
    print(f"identical answers: {same} of {len(va)}; right on the {len(labelled)} labelled messages: "
          f"vLLM {right_v}, transformers {right_t}")


if __name__ == "__main__":
    main()
