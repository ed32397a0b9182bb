"""Student answers on the holdout, through Ray Data, and the student's speed at batch 1 and at the
serving batch size. The teacher is not called: its holdout answers are already in `teacher/`."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

PREDICTION_SCHEMA = pa.schema([("id", pa.string()), ("student", pa.string()), ("confidence", pa.float64()),
                               ("completion_tokens", pa.int64())])


class StudentPredictor:
    """A Ray Data actor: one student loaded once, greedy answers with their mean token logprob."""

    def __init__(self, model_uri: str, max_new_tokens: int, threads: int = 1):
        import torch

        from distill_ray.models import load_causal_lm
        from distill_ray.teacher.batcher import BatchGenerator

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_causal_lm(model_uri)
        self.generator = BatchGenerator(self.model, self.tokenizer, max_batch=1024)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = answer(self.generator, self.tokenizer, [r["messages"] for r in rows], self.max_new_tokens)
        return pa.Table.from_pylist([{"id": r["id"], **res} for r, res in zip(rows, results, strict=True)],
                                    schema=PREDICTION_SCHEMA)


def answer(generator, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[dict[str, Any]]:
    from distill_ray.teacher.batcher import GenerationRequest
    from distill_ray.train.data import prompt_ids

    requests = [GenerationRequest(prompt_ids=prompt_ids(tokenizer, m), max_tokens=max_new_tokens) for m in conversations]
    out = []
    for result in generator.generate(requests):
        confidence = sum(result.logprobs) / len(result.logprobs) if result.logprobs else None
        out.append({"student": result.text.strip(), "confidence": confidence, "completion_tokens": len(result.token_ids)})
    return out


def measure_speed(model_uri: str, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int,
                  latency_samples: int, threads: int) -> dict[str, Any]:
    """Per-request latency at batch 1 (p50/p95) and requests/s at the serving batch size, in one
    process with `threads` CPU threads (run as a Ray task with that many CPUs)."""
    import torch

    from distill_ray.eval.scoring import percentile
    from distill_ray.models import load_causal_lm
    from distill_ray.teacher.batcher import BatchGenerator

    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_uri)
    generator = BatchGenerator(model, tokenizer, max_batch=max(batch_size, 1))
    answer(generator, tokenizer, conversations[:1], max_new_tokens)  # warm-up
    latencies = []
    for conv in (conversations * (latency_samples // max(1, len(conversations)) + 1))[:latency_samples]:
        start = time.perf_counter()
        answer(generator, tokenizer, [conv], max_new_tokens)
        latencies.append((time.perf_counter() - start) * 1000)
    sample = (conversations * (batch_size * 2 // max(1, len(conversations)) + 1))[: batch_size * 2]
    start = time.perf_counter()
    for i in range(0, len(sample), batch_size):
        answer(generator, tokenizer, sample[i:i + batch_size], max_new_tokens)
    seconds = time.perf_counter() - start
    return {"p50_latency_ms": round(percentile(latencies, 50), 1), "p95_latency_ms": round(percentile(latencies, 95), 1),
            "requests_per_s_at_batch": round(len(sample) / seconds, 2), "batch_size": batch_size,
            "seconds_per_request_at_batch": seconds / len(sample), "threads": threads,
            "parameters": sum(p.numel() for p in model.parameters())}
