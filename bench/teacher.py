"""Teacher generation against a rate-limited OpenAI-compatible server: ours vs ray.data.llm, side by side.

    .venv/bin/python bench/teacher.py                     # R = 960 requests/min for 2 minutes each
    .venv/bin/python bench/teacher.py --rpm 600 --seconds 60 --skip-throughput
    .venv/bin/python bench/teacher.py --skip-rate --skip-tokens  # fan-out efficiency only

1. Rate limit. The scripted fake teacher (distill_ray.testing.fake_teacher, its own process on
   127.0.0.1) enforces a global R requests per sliding minute with 429 + Retry-After. Then:
   - ours: `distill-ray generate` with 4 workers and `requests_per_minute: R`;
   - baseline: `ray.data.llm`'s HttpRequestProcessorConfig with concurrency 4 and
     qps = R / 60 / 4 per worker (its qps is per worker; it sends one request at a time per batch).
   Each gets about 2.2 x R prompts; the answered rate is measured from the server's ledger over the
   first `--seconds` after the first answer, and printed as a ratio of R, with the share of 429s.
2. Token limit: the server allows T tokens per sliding minute (no request limit); ours runs with
   `tokens_per_minute: T`, so the tokens bucket is what binds. Printed as tokens/min over T, with 429s.
3. Throughput with no limit and 50 ms latency: `distill-ray generate` at max_concurrency 8, 32 and
   128 against a bare asyncio + aiohttp loop with the same concurrency and the very same requests
   (the ceiling for one process), as answers/s and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_ray.config import load_config  # noqa: E402
from distill_ray.manifest import StepRecord, write_manifest  # noqa: E402
from distill_ray.prompts.step import ARTIFACT_SCHEMA  # noqa: E402
from distill_ray.storage import Workdir  # noqa: E402
from distill_ray.teacher.client import request_body  # noqa: E402
from distill_ray.teacher.step import run_generate  # noqa: E402
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig  # noqa: E402


def _prompt(i: int) -> str:
    return f"Hello, where is my order ORD-{100000 + i}? Ticket {i}, still waiting."


def _write_prompts(workdir: Workdir, n: int) -> None:
    rows = [{"id": f"p{i:07d}", "messages": [{"role": "user", "content": _prompt(i)}], "category": "shipping",
             "reference": None, "cluster": f"p{i:07d}", "source": f"bench:{i}"} for i in range(n)]
    workdir.write_table(pa.Table.from_pylist(rows, schema=ARTIFACT_SCHEMA), "prompts", "train")
    workdir.write_table(pa.Table.from_pylist([], schema=ARTIFACT_SCHEMA), "prompts", "holdout")
    write_manifest(workdir, StepRecord("prompts", {"bench": str(n)}, {}))


def _rate(stats: dict, seconds: float) -> tuple[float, float]:
    stamps = sorted(stats["answered_timestamps"])[1:]  # the first is the driver's preflight request
    if not stamps:
        return 0.0, 0.0
    start = stamps[0]
    within = sum(1 for s in stamps if s <= start + seconds)
    limited = stats["by_kind"].get("rate_limited", 0)
    return within / seconds * 60.0, limited / max(1, stats["requests"])


def ours(teacher: FakeTeacher, tmp: str, n: int, rpm: float, concurrency: int, workers: int, tpm: float = 0) -> dict:
    workdir = Workdir(f"{tmp}/ours-{rpm}-{concurrency}-{time.monotonic_ns()}")
    _write_prompts(workdir, n)
    config = load_config(None, [
        f"workdir={workdir.uri}", f"teachers.0.base_url={teacher.base_url}", "teachers.0.model=fake",
        f"teachers.0.requests_per_minute={rpm}", f"teachers.0.max_concurrency={concurrency}",
        f"teachers.0.tokens_per_minute={tpm}",
        "teachers.0.max_retries=8", "teachers.0.timeout_s=30", f"generate.num_workers={workers}",
        "generate.progress_every_s=30",
    ])
    teacher.reset()
    start = time.monotonic()
    run_generate(config, echo=lambda line: None)
    return {"stats": teacher.stats(), "wall_s": time.monotonic() - start}


def baseline(teacher: FakeTeacher, n: int, rpm: float, concurrency: int, seconds: float) -> dict:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    qps = max(1, int(rpm / 60 / concurrency))
    processor = build_processor(
        HttpRequestProcessorConfig(url=f"{teacher.base_url}/chat/completions", qps=qps, concurrency=concurrency,
                                   batch_size=16, max_retries=8, base_retry_wait_time_in_s=1),
        preprocess=lambda row: {"payload": {"model": "fake", "messages": [{"role": "user", "content": row["text"]}],
                                            "max_tokens": 16}},
        postprocess=lambda row: {"ok": bool(row.get("http_response"))},
    )
    teacher.reset()
    start = time.monotonic()
    # Stop reading once the measurement window (plus start-up) is over: it may be far from done.
    for _ in processor(ray.data.from_items([{"text": _prompt(i)} for i in range(n)])).iter_batches(batch_size=16):
        if time.monotonic() - start > seconds + 30:
            break
    return {"stats": teacher.stats(), "wall_s": time.monotonic() - start, "qps": qps}


async def _bare(base_url: str, n: int, concurrency: int) -> None:
    """The ceiling: one asyncio loop sending the very requests `ours` sends (same body: logprobs and
    top_logprobs included, which is most of the server's work) and parsing each answer's JSON."""
    teacher = load_config(None, [f"teachers.0.base_url={base_url}", "teachers.0.model=fake"]).teachers[0]
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int) -> None:
            async with semaphore:
                body = json.dumps(request_body(teacher, [{"role": "user", "content": _prompt(i)}]))
                async with session.post(f"{base_url}/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    json.loads(await response.read())

        await asyncio.gather(*(one(i) for i in range(n)))


def _throughput(stats: dict, skip_first: bool) -> float:
    """Steady answers/s: between the 10th and the 90th percentile answer (after the driver's preflight
    one, for ours), so neither the worker pool's start-up nor the last stragglers count, for either."""
    stamps = sorted(stats["answered_timestamps"])[1 if skip_first else 0:]
    lo, hi = len(stamps) // 10, len(stamps) * 9 // 10
    return (hi - lo) / (stamps[hi] - stamps[lo]) if hi > lo else 0.0


def rate_limit(args: argparse.Namespace, tmp: str, n: int) -> None:
    with FakeTeacher(FakeTeacherConfig(rpm=int(args.rpm), latency_s=args.latency)) as teacher:
        mine = ours(teacher, tmp, n, args.rpm, concurrency=64, workers=4)
        rate, limited = _rate(mine["stats"], args.seconds)
        print(f"rate limit R={args.rpm:.0f}/min, {n} prompts, latency {args.latency * 1000:.0f} ms, 4 workers")
        print(f"  distill-ray generate: answered {rate:.1f}/min over {args.seconds:.0f}s = {rate / args.rpm:.3f} x R; "
              f"429s {limited:.1%} of {mine['stats']['requests']} requests")
        base = baseline(teacher, n, args.rpm, concurrency=4, seconds=args.seconds)
        base_rate, base_limited = _rate(base["stats"], args.seconds)
        print(f"  ray.data.llm HTTP processor (qps={base['qps']}/worker x 4): answered {base_rate:.1f}/min = "
              f"{base_rate / args.rpm:.3f} x R; 429s {base_limited:.1%} of {base['stats']['requests']} requests")
        print(f"  ratio ours / ray.data.llm: {rate / max(base_rate, 1e-9):.2f}")


def token_limit(args: argparse.Namespace, tmp: str) -> None:
    """The tokens-per-minute bucket as the binding limit: the server allows T tokens per sliding
    minute (and no request limit); ours is set to the same T, with requests far above what T allows."""
    tpm = args.tpm
    with FakeTeacher(FakeTeacherConfig(tpm=int(tpm), latency_s=args.latency)) as teacher:
        probe = ours(teacher, tmp, 20, 1e6, concurrency=8, workers=1)["stats"]
        per_answer = (probe["prompt_tokens"] + probe["completion_tokens"]) / max(1, probe["answered"])
        n = int(tpm / per_answer * args.seconds / 60 * 1.1) + 20
        time.sleep(61)  # the probe's tokens leave the server's sliding minute
        mine = ours(teacher, tmp, n, 1e6, concurrency=64, workers=4, tpm=tpm)
        rate, limited = _rate(mine["stats"], args.seconds)
        tokens_rate = rate * per_answer
        print(f"token limit T={tpm:.0f} tokens/min (about {per_answer:.1f} tokens an answer: "
              f"{tpm / per_answer:.0f} answers/min), {n} prompts, 4 workers")
        print(f"  distill-ray generate: {tokens_rate:.0f} tokens/min over {args.seconds:.0f}s = {tokens_rate / tpm:.3f} x T "
              f"({rate:.0f} answers/min); 429s {limited:.1%} of {mine['stats']['requests']} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=float, default=960, help="R: the server's global limit, requests/min")
    parser.add_argument("--seconds", type=float, default=120, help="measurement window for the rate")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--tpm", type=float, default=60000, help="T: the server's global token limit, tokens/min")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-tokens", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    n = int(args.rpm * args.seconds / 60 * 1.1) + 20
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        if not args.skip_rate:
            rate_limit(args, tmp, n)
        if not args.skip_tokens:
            token_limit(args, tmp)
        if args.skip_throughput:
            return
        print(f"no limit, {args.latency * 1000:.0f} ms latency: answers/s (server ledger)")
        with FakeTeacher(FakeTeacherConfig(latency_s=args.latency)) as teacher:
            for concurrency in (8, 32, 128):
                count = max(800, int(concurrency / args.latency * 6))
                mine = ours(teacher, tmp, count, 1e7, concurrency=concurrency, workers=2)
                ours_rps = _throughput(mine["stats"], skip_first=True)
                teacher.reset()
                asyncio.run(_bare(teacher.base_url, count, concurrency))
                bare_rps = _throughput(teacher.stats(), skip_first=False)
                print(f"  max_concurrency {concurrency:>3}: distill-ray {ours_rps:7.1f}/s, bare asyncio loop "
                      f"{bare_rps:7.1f}/s, ratio {ours_rps / bare_rps:.2f} (ideal {concurrency / args.latency:.0f}/s)")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
