"""Steps 1 and 2: the task (what the student must do, the quality bar) and the prompt set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill_ray.config.base import Regex, Strict


class FewShotTurn(Strict):
    """One example exchange shown to the teacher before each prompt."""

    user: str = Field(description="An example user message.")
    assistant: str = Field(description="The answer the teacher should give to it.")


class Bar(Strict):
    """The quality bar, stated before any model exists; `distill-ray eval` gates on it."""

    min_relative_quality: float = Field(0.95, ge=0, le=2, description="Student score / teacher score on the holdout.")
    min_slice_relative_quality: float = Field(
        0.90, ge=0, le=2, description="The same ratio, required of every slice (category)."
    )
    max_p95_latency_ms: float = Field(500, gt=0, description="Student p95 latency per request at batch 1.")
    max_cost_per_1k_requests_usd: float = Field(0.10, ge=0, description="Student serving cost per 1,000 requests.")
    min_slice_holdout_rows: int = Field(
        5, ge=1, description="Slices with fewer holdout rows are reported but not gated (too few to judge)."
    )


class Task(Strict):
    """Step 1: what the student must do and how good it must be."""

    instructions: str = Field(
        "", description="System prompt for teacher and student. Empty means none."
    )
    few_shot: list[FewShotTurn] = Field(
        default_factory=list,
        description="Example turns shown to the teacher only (the student learns the behaviour and "
        "serves without them, which keeps its prompts short).",
    )
    metric: Literal["exact_match", "normalized_match", "json_match", "token_f1", "regex", "llm_judge"] = Field(
        "exact_match", description="How an answer is scored against another (student vs teacher, or vs reference). "
        "'llm_judge' (open-ended tasks): eval asks a teacher (eval.judge_teacher) whether the answer is as good as "
        "the other, rate limited and cached like generate; training's in-loop check, the serve app's shadow agreement "
        "and the replay use token_f1 instead."
    )
    metric_pattern: Regex | None = Field(
        None, description="For metric 'regex': the answer is correct when it matches this pattern (re.search)."
    )
    bar: Bar = Field(default_factory=Bar, description="The quality bar eval gates the students on.")

    @property
    def string_metric(self) -> str:
        """The metric scored from the two answers alone: `metric`, except 'llm_judge', for which token_f1
        stands in. Training's in-loop check, the serve app's shadow agreement and the replay use it: a judge
        call per check would bill the teacher every few steps or requests."""
        return "token_f1" if self.metric == "llm_judge" else self.metric

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> Task:
        if self.metric == "regex":
            if not self.metric_pattern:
                raise ValueError("metric 'regex' needs task.metric_pattern (a Python regular expression)")
        return self


class Prompts(Strict):
    """Step 2: turning production logs into a deduplicated, representative prompt set."""

    source: str | list[str] = Field(
        "jobs/data/support_orders.jsonl",
        description="Log file(s), directory or glob: .jsonl/.json, .parquet or .csv; local path or s3:// URI. "
        "Relative paths are resolved against the working directory.",
    )
    format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="Source format; 'auto' picks it from the file extension."
    )
    text_field: str | None = Field("text", description="Field holding the user's message as plain text.")
    messages_field: str | None = Field(
        None, description="Field holding an OpenAI-style `messages` list instead of plain text (then set "
        "text_field to null). A trailing assistant message is dropped: the teacher answers the rest."
    )
    category_field: str | None = Field(
        "category", description="Field naming the slice (category). Rows without it fall in 'unknown'."
    )
    reference_field: str | None = Field(
        None, description="Optional ground-truth answer, used by verifier filters and eval."
    )
    size: int = Field(2000, ge=1, description="Prompts to keep after dedupe (train + holdout).")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of every category held out from training.")
    holdout_min_per_category: int = Field(
        5, ge=0, description="Rare categories still get at least this many holdout prompts (if they have them), "
        "so every slice can be evaluated."
    )
    min_per_category: int = Field(
        20, ge=0, description="Rare categories (edge cases) keep at least this many prompts (if the source has "
        "them) rather than vanishing when sampling down to `size`."
    )
    dedupe: Literal["none", "exact", "near"] = Field(
        "near", description="none: keep duplicates; exact: drop prompts equal after normalisation (case, "
        "spacing, punctuation); near: also drop near duplicates (MinHash LSH over character shingles)."
    )
    near_threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity of character shingles above which two "
        "prompts are near duplicates."
    )
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (signature length).")
    shingle_size: int = Field(5, ge=2, le=16, description="Characters per shingle.")
    seed: int = Field(0, description="Seed for sampling and the holdout split.")
    limit: int | None = Field(None, ge=1, description="Smoke knob: read at most this many source rows.")

    @model_validator(mode="after")
    def _one_text_source(self) -> Prompts:
        if bool(self.text_field) == bool(self.messages_field):
            raise ValueError("set exactly one of prompts.text_field and prompts.messages_field (the other to null)")
        if not self.source:
            raise ValueError("prompts.source is empty: name a log file, directory or glob")
        return self
