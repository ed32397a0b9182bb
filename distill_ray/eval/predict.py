"""Student answers on the holdout through the inference engine, on Ray Data, and the student's speed
on that same engine. The teacher is not called: its holdout answers are already in `teacher/`.

Each actor of the pool (`StudentPredictor`, `eval.num_workers` of them) opens the student once in
`eval.engine` (vLLM unless it says otherwise: the engine serve runs), with that engine's resources
(`ray_options`; under tensor parallelism a placement group of its own, in which vLLM's Ray executor
finds its GPUs), and answers batches of holdout prompts with their confidence (mean token logprob).

Speed is measured on one of those engines rather than on one started for it (a vLLM start is most of
an eval's time on CPU): on the pool's first engine, once every engine of the pool has started and
before any of them answers (`EnginePool` holds the others back), so that nothing else loads or
decodes while it is timed.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from distill_ray.config.schema import Engine, Eval
    from distill_ray.engine import ChatEngine

PREDICTION_SCHEMA = pa.schema([("id", pa.string()), ("student", pa.string()), ("confidence", pa.float64()),
                               ("completion_tokens", pa.int64())])
# How long the timed engine waits for the pool's other engines to start before it is timed anyway
# (an actor the cluster cannot place), how long those wait for the timing to end, and how long eval
# waits for the engines to stop once the holdout is answered.
ENGINES_UP_WAIT_S = 900.0
TIMING_WAIT_S = 3600.0
STOP_WAIT_S = 120.0


def predict(model_uri: str, rows: list[dict[str, Any]], settings: Eval,
            max_new_tokens: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The student's answers to `rows` (id, messages) and its speed (see `measure_speed`).

    Runs on the connected Ray cluster: `settings.num_workers` engines in a Ray Data actor pool,
    stopped (their memory freed) when this returns.

    Returns:
        ({id: {id, student, confidence, completion_tokens}}, speed).
    """
    import ray
    import ray.data
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from distill_ray.engine import placement_bundles, ray_options

    engine, workers = settings.engine, settings.num_workers
    options: dict[str, Any] = ray_options(engine)
    groups: list = []
    if (bundles := placement_bundles(engine)) is not None:
        # Tensor parallelism: each actor in a placement group of its own, where vLLM's Ray executor starts
        # one worker per GPU bundle. The actor sits in the CPU bundle (ray_options leaves the accelerator
        # type to the GPU bundles).

        def own_group() -> dict[str, Any]:
            # Ray Data calls this, in this process, as it starts each actor of the pool (all of them first),
            # and again to read the settings (Ray 2.60's memory-issue detector): a group only for the
            # first `workers` calls, so that no stray group holds GPUs for the whole eval.
            if len(groups) >= workers:
                return {}
            groups.append(ray.util.placement_group(bundles, strategy="STRICT_PACK"))
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                groups[-1], placement_group_capture_child_tasks=True)}

        options["ray_remote_args_fn"] = own_group
    # A batch fills an engine's continuous batch, and every worker gets some.
    batch = max(1, min(engine.max_num_seqs, math.ceil(len(rows) / workers)))
    pool = ray.remote(num_cpus=0)(EnginePool).remote(workers, ENGINES_UP_WAIT_S, TIMING_WAIT_S)
    speed_args = {"conversations": [r["messages"] for r in rows], "batch_size": settings.batch_size,
                  "latency_samples": settings.latency_samples}
    try:
        ds = ray.data.from_items([{"id": r["id"], "messages": r["messages"]} for r in rows],
                                 override_num_blocks=math.ceil(len(rows) / batch))
        with warnings.catch_warnings():
            # Ray 2.60 deprecates ray_remote_args_fn (ray.data.llm's own way to a placement group per
            # engine) without a replacement yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
            out = ds.map_batches(StudentPredictor, batch_size=batch, batch_format="pyarrow",
                                 compute=ray.data.ActorPoolStrategy(size=workers),
                                 fn_constructor_kwargs={"model_uri": model_uri, "engine": engine,
                                                        "max_new_tokens": max_new_tokens, "pool": pool,
                                                        "speed_args": speed_args},
                                 **options)
        predictions = {p["id"]: p for p in out.take_all()}
        speed = ray.get(pool.result.remote())
        ray.get(pool.wait_stopped.remote(STOP_WAIT_S))
    finally:
        ray.kill(pool)
        for group in groups:
            ray.util.remove_placement_group(group)
    return predictions, speed


class StudentPredictor:
    """A Ray Data actor: the student opened once in its engine, greedy answers with their confidence.

    With `pool` (an `EnginePool`), the pool's first engine is timed (`measure_speed`) before it
    answers, and the others wait for that to end.
    """

    def __init__(self, model_uri: str, engine: Engine, max_new_tokens: int, pool: Any = None,
                 speed_args: dict[str, Any] | None = None):
        import ray

        from distill_ray.engine import open_engine

        start = time.perf_counter()
        self.engine = open_engine(model_uri, engine)
        started_s = time.perf_counter() - start
        self.max_new_tokens, self.pool = max_new_tokens, pool
        if pool is not None and ray.get(pool.arrive.remote()):
            try:
                speed = measure_speed(self.engine, max_new_tokens=max_new_tokens,
                                      threads=max(1, int(engine.num_cpus)), **(speed_args or {}))
            except Exception as err:
                ray.get(pool.report.remote(None, f"{type(err).__name__}: {err}"))
                raise
            ray.get(pool.report.remote({**speed, "engine_start_s": round(started_s, 1)}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers = self.engine.generate_batch([r["messages"] for r in rows], self.max_new_tokens)
        return pa.Table.from_pylist([{"id": r["id"], "student": a.text.strip(), "confidence": a.confidence,
                                      "completion_tokens": a.completion_tokens}
                                     for r, a in zip(rows, answers, strict=True)], schema=PREDICTION_SCHEMA)

    def __del__(self) -> None:
        """Stop the engine (Ray Data calls this as the pool's actors exit): its processes end now and free
        their memory, rather than outliving the actor for a while and logging an engine failure."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        engine.close()  # returns once the engine has stopped
        if getattr(self, "pool", None) is not None:
            import ray

            try:
                ray.get(self.pool.stopped.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - eval already has its answers; it stops waiting after STOP_WAIT_S
                pass


def measure_speed(engine: ChatEngine, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                  batch_size: int, latency_samples: int, threads: int) -> dict[str, Any]:
    """Per-request latency at batch 1 (p50/p95 of `latency_samples` sequential requests) and requests/s
    at `batch_size` (two batches), after a warm-up (the first requests after a start are slow).

    Args:
        engine: an open engine, otherwise idle.
        conversations: prompts to cycle through (distinct ones for warm-up, latency and throughput
            as far as there are enough, so prefix caching helps no more than a shared prompt prefix would).
        threads: the engine's CPU threads (its `num_cpus`), for the record.
    """
    from distill_ray.eval.scoring import percentile

    def take(start: int, n: int) -> list[list[dict[str, str]]]:
        return [conversations[(start + i) % len(conversations)] for i in range(n)]

    engine.generate_batch(take(-1, 1), max_new_tokens)
    engine.generate_batch(take(-1 - batch_size, batch_size), max_new_tokens)
    latencies = []
    for conversation in take(0, latency_samples):
        start = time.perf_counter()
        engine.generate_batch([conversation], max_new_tokens)
        latencies.append((time.perf_counter() - start) * 1000)
    sample = take(latency_samples, batch_size * 2)
    start = time.perf_counter()
    for i in range(0, len(sample), batch_size):
        engine.generate_batch(sample[i:i + batch_size], max_new_tokens)
    seconds = time.perf_counter() - start
    info = engine.info()
    return {"p50_latency_ms": round(percentile(latencies, 50), 1), "p95_latency_ms": round(percentile(latencies, 95), 1),
            "requests_per_s_at_batch": round(len(sample) / seconds, 2), "batch_size": batch_size,
            "seconds_per_request_at_batch": seconds / len(sample), "threads": threads,
            "parameters": info["parameters"], "engine": info}


class EnginePool:
    """The engines of an eval's actor pool (a Ray actor without CPUs): which one is timed and when, and
    when they have all stopped.

    Every actor calls `arrive` once its engine has started. The first one is timed once all `workers`
    have arrived (or `up_wait_s` has passed: an actor the cluster cannot place), and reports; the others
    return from `arrive` when it has (or after `timing_wait_s`: the timed actor died), and only then
    answer. Each calls `stopped` as its engine stops, so that the next student's engines start on
    freed memory (`wait_stopped`).
    """

    def __init__(self, workers: int, up_wait_s: float, timing_wait_s: float):
        self.workers, self.up_wait_s, self.timing_wait_s = workers, up_wait_s, timing_wait_s
        self.arrived = self.left = 0
        self.up_when_timed: int | None = None  # engines started when the timing began
        self.all_up, self.done, self.all_left = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.speed: dict[str, Any] | None = None
        self.error: str | None = None

    async def arrive(self) -> bool:
        """True for the actor to time (it then calls `report`)."""
        self.arrived += 1
        self.all_left.clear()
        if self.arrived >= self.workers:
            self.all_up.set()
        if self.done.is_set():
            return False
        if self.up_when_timed is None:
            self.up_when_timed = 0
            await _wait(self.all_up, self.up_wait_s)
            self.up_when_timed = min(self.arrived, self.workers)
            return True
        await _wait(self.done, self.timing_wait_s)
        return False

    def report(self, speed: dict[str, Any] | None, error: str | None = None) -> None:
        if speed is not None:
            self.speed = {**speed, "engines_up_when_timed": f"{self.up_when_timed} of {self.workers}"}
        self.error = error
        self.done.set()

    def result(self) -> dict[str, Any]:
        if self.speed is None:
            raise RuntimeError(f"eval: the speed measurement failed: {self.error}" if self.error else
                               "eval: the speed measurement did not finish (its worker died)")
        return self.speed

    def stopped(self) -> None:
        self.left += 1
        if self.left >= self.arrived:
            self.all_left.set()

    async def wait_stopped(self, timeout: float) -> int:
        """Wait until every engine that started has stopped (at most `timeout` s); how many have not."""
        if self.left < self.arrived:
            await _wait(self.all_left, timeout)
        return self.arrived - self.left


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
