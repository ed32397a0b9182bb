"""Step 6: evaluating the students on the holdout against the teacher."""

from __future__ import annotations

from pydantic import Field

from distill_ray.config.base import Strict
from distill_ray.config.teachers import Engine


class Eval(Strict):
    """Step 6: each student answers the holdout (on `engine`) and is measured against the reference teacher
    (quality per slice, latency, cost), then gated on task.bar."""

    batch_size: int = Field(8, ge=1, description="Batch size for throughput (the one serving will use).")
    num_workers: int = Field(2, ge=1, description="Ray Data actors answering the holdout, one engine each.")
    latency_samples: int = Field(32, ge=1, description="Requests timed at batch 1 for p50/p95.")
    engine: Engine = Field(default_factory=Engine, description="The engine answering the holdout (one per worker).")
    price_per_instance_hour_usd: float = Field(0.10, ge=0, description="Price of the machine serving the student.")
    judge_teacher: str | None = Field(
        None, description="For task.metric 'llm_judge': the teacher (by name) that judges; default: the first.")
    judge_instructions: str | None = Field(
        None, description="For 'llm_judge': the judge's rubric (system prompt); default: a built-in one asking for 1 "
        "when the candidate answers the message as well as the reference, else 0.")
    judge_max_tokens: int = Field(4, ge=1, le=512, description="For 'llm_judge': tokens the judge may answer with.")
    limit: int | None = Field(None, ge=1, description="Smoke knob: evaluate at most this many holdout prompts.")
