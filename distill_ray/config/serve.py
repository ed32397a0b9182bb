"""Step 7 and after: serving the student with a rollout, drift, and the flywheel (distil again from traffic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from distill_ray.config.base import Strict
from distill_ray.config.teachers import Engine

RolloutMode = Literal["shadow", "canary", "full"]
CanaryPercent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False,
                                       description="Share of users (sticky by user) served by the student.")]
MinConfidence = Annotated[float, Field(le=0, allow_inf_nan=False, description=(
    "Student answers below this mean token logprob fall back to the teacher (a mean logprob is at most 0)."))]
LatencyBudgetMs = Annotated[float, Field(gt=0, allow_inf_nan=False, description=(
    "Student answers slower than this fall back (for a stream: slower to its first stream_judge_tokens tokens)."))]


class Rollout(Strict):
    """The live routing settings: the one definition the config, `distill-ray rollout` and the serve
    app's control endpoint all validate with (a bad value is refused wherever it comes from). No defaults
    here: the app starts from the `serve:` section's fields of the same names, the one place they are set."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: RolloutMode
    canary_percent: CanaryPercent
    min_confidence: MinConfidence
    latency_budget_ms: LatencyBudgetMs

    @field_validator("canary_percent", "min_confidence", "latency_budget_ms", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # JSON's 25 is 25.0; strict mode refuses "25", true and null
        return value


class Guardrails(Strict):
    """What a rollout stage must show before the plan advances, and what pulls it back at once.
    Read from the live metrics of the requests the student handled in the stage (in shadow stages:
    its background comparisons). null disables a guardrail."""

    min_requests: int = Field(100, ge=1, description="Student requests a stage must see before it may advance.")
    window_requests: int = Field(
        50, ge=1, description="The guardrails are judged over the stage's last this many student requests: a break "
        "there steps back at once (the stage is judged whole before it advances).")
    max_fallback_rate: float | None = Field(0.3, ge=0, le=1, description="Student answers replaced by the teacher's.")
    max_error_rate: float | None = Field(
        0.05, ge=0, le=1, description="Student requests that failed (student errors, timeouts, error responses).")
    max_p95_ms: float | None = Field(None, gt=0, description="p95 latency of the requests the student handled.")
    min_shadow_agreement: float | None = Field(
        0.8, ge=0, le=1, description="Shadow stages: mean agreement of the student's answers with the teacher's.")


class RolloutStage(Strict):
    """One stage of `serve.rollout_plan`: shadow, a canary share, or full (100)."""

    stage: Literal["shadow"] | CanaryPercent = Field(description="'shadow' or the percent of users on the student.")
    guardrails: dict[str, Any] = Field(default_factory=dict, description="Overrides of serve.guardrails.")

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {"stage": data}  # `shadow` or `25` alone

    @property
    def mode(self) -> RolloutMode:
        if self.stage == "shadow":
            return "shadow"
        return "full" if self.stage >= 100 else "canary"

    @property
    def label(self) -> str:
        return "shadow" if self.stage == "shadow" else f"{self.stage:g}%"


class Serve(Strict):
    """Step 7: the Serve app answering clients with the student, the teacher behind it."""

    mode: RolloutMode = Field(
        "shadow", description="The rollout the app starts with (a rollout_plan starts at its first stage instead): "
        "shadow (the teacher answers, the student answers too in the background and both are logged), canary "
        "(canary_percent of users get the student) or full (every request goes to the student). "
        "`distill-ray rollout` changes it live.")
    engine: Engine = Field(default_factory=Engine, description="The engine of each student replica.")
    canary_percent: CanaryPercent = 5
    min_confidence: MinConfidence | Literal["recommended"] = Field(
        -0.3, description="Student answers below this mean token logprob fall back to the teacher; 'recommended': the "
        "threshold eval recommends for the served student (the least fallback that keeps the bar).")
    latency_budget_ms: LatencyBudgetMs = 2000
    rollout_plan: list[RolloutStage] | None = Field(
        None, description="Progressive rollout by itself: stages such as [shadow, 5, 25, 100] (each a stage, or "
        "{stage: 25, guardrails: {...}}). The app starts at the first stage, advances when every guardrail holds "
        "over the stage's requests, and steps back one stage at once when one breaks (then holds until "
        "`distill-ray rollout --plan resume`). null: the rollout changes only by `distill-ray rollout`.")
    guardrails: Guardrails = Field(default_factory=Guardrails, description="The rollout plan's guardrails per stage.")
    skip_eval_gate: bool = Field(
        False, description="Let a student that did not pass eval answer clients (canary, full). The serve app refuses "
        "it otherwise, whoever asks.")
    admin_token_env: str | None = Field(
        "DISTILL_ADMIN_TOKEN", description="Env var holding the admin token for the control endpoints (rollout, "
        "stats); the API token is refused there (403).")
    allow_open_endpoint: bool = Field(
        False, description="Serve without a token (auth_token_env / admin_token_env null). Refused unless set.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a client may ask for (400 above it).")
    categories: list[str] | None = Field(
        None, description="The slices metrics are labelled with (x-category or metadata.category); any other value "
        "counts as 'other', none sent as 'unknown'. null: the prompt set's categories (prompts/report.json).")
    max_json_depth: int = Field(32, ge=2, le=256, description="Deepest JSON nesting a request body may have.")
    log_flush_s: float = Field(
        0.5, gt=0, le=60, description="Request log lines are written at least this often: at most this interval's "
        "lines are lost when a router replica dies.")
    log_queue_max: int = Field(
        4096, ge=1, description="Request log lines a router replica holds unwritten; a full queue slows requests down "
        "(backpressure) for up to log_block_s, then the line is dropped and counted.")
    log_block_s: float = Field(2.0, ge=0, description="Longest wait of a request for room in a full log queue.")
    stream_judge_tokens: int = Field(
        4, ge=1, le=256, description="A streamed student answer is judged (mean token logprob against min_confidence) "
        "on its first this many tokens, held back until then; the rest streams as it is decoded. A stream that "
        "falls back is the teacher's answer.")
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive student errors or timeouts after which the router stops calling the student "
        "for breaker_cooldown_s (fallback reason 'student_unavailable'), then tries one request again.")
    breaker_cooldown_s: float = Field(
        5.0, gt=0, description="Seconds the router stays off the student once breaker_failures opened the breaker.")
    student: str | None = Field(None, description="Student name to serve; default: the best that passed eval.")
    student_adapter: bool = Field(
        False, description="For a LoRA student (students[].lora) on vLLM: serve its base (`init/`) with the adapter "
        "(`best/adapter/`, vLLM's LoRA) instead of the merged export; answers are the same, and one base can carry "
        "several adapters.")
    teacher: str | None = Field(None, description="Teacher name to fall back to; default: the first.")
    host: str = Field("127.0.0.1", description="Address Ray Serve's HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port of Ray Serve's HTTP proxy.")
    auth_token_env: str | None = Field("DISTILL_SERVE_TOKEN", description="Env var holding the bearer token.")
    max_request_bytes: int = Field(65536, ge=1024, description="Largest request body; a larger one is refused (413).")
    num_replicas: int | Literal["auto"] = Field(1, description="Student replicas, or 'auto' for autoscaling.")
    min_replicas: int = Field(1, ge=0, description="num_replicas 'auto': the fewest student replicas the autoscaler "
                              "keeps.")
    max_replicas: int = Field(4, ge=1, description="num_replicas 'auto': the most student replicas the autoscaler "
                              "starts (it aims at 8 requests in flight per replica).")
    log_batch_size: int = Field(64, ge=1, description="Request log lines written per batch (at most).")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many student replicas per node (1: every replica on another node, so "
        "losing a node loses one replica).")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Ray Serve's HTTP proxies: on every node (behind a load balancer) or on the head only.")
    student_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each student replica asks for, e.g. "
        "{'accelerator_type:L4': 0.001} or a node's custom resource.")
    router_replicas: int = Field(1, ge=1, description="Router (ingress) replicas; each is one Python process.")
    router_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each router replica asks for (e.g. pin it to the head).")
    replay_requests: int | None = Field(
        None, ge=1, description="`distill-ray replay` (and the run's replay step): held-out prompts sent per phase, "
        "a fixed sample that keeps the holdout's mix; null: all of them.")
    replay_concurrency: int = Field(8, ge=1, le=256, description="Clients at once during the replay.")


class Drift(Strict):
    """`distill-ray drift`: whether the served traffic still looks like what the student was trained on.
    A threshold crossed makes the verdict `drift`, with that check as a reason."""

    max_category_psi: float = Field(0.2, gt=0, description="Population stability index above which the mix drifted.")
    max_length_shift: float = Field(0.25, gt=0, description="Relative change of median prompt length.")
    max_unseen_token_rate: float = Field(
        0.05, ge=0, le=1, description="Share of the served prompts' words that never appear in the training prompts.")
    min_shadow_agreement: float = Field(
        0.9, ge=0, le=1, description="Mean agreement of the student's shadow answers with the teacher's, per slice "
        "(slices with at least 5 shadow requests).")


class Flywheel(Strict):
    """`distill-ray redistill`: distil again from the served traffic."""

    min_new_prompts: int = Field(
        50, ge=1, description="Fewer new served prompts (not in any earlier prompt set) than this: no round.")
    min_gain: float = Field(
        0.01, ge=0, le=1, description="The new student is promoted (flywheel/promoted.json, then the rollout plan) "
        "only when its relative quality beats the served student's on the round's holdout by at least this much.")
