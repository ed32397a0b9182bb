"""vLLM's async engine behind the ChatEngine protocol (CPU build here, CUDA build on GPU nodes).

The engine lives on an event loop of its own, in a thread: Serve replicas await it from theirs, and
eval's Ray Data actors call it from plain (blocking) code; a request cancelled by its caller (a
router's latency budget, a client gone) is aborted in the engine. Prompts are rendered with the
model's chat template into token ids here, so the student answers the prompt it was trained on.

A LoRA student's adapter (`students/<name>/best/adapter/`) is served on top of its base (`init/`):
the engine starts with LoRA enabled (`lora_kwargs`) and every request carries the adapter.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from distill_ray.config.schema import Engine
from distill_ray.engine.answers import Answer, Delta

_DONE = object()


def engine_env(engine: Engine) -> dict[str, str]:
    """Environment vLLM reads when its engine starts.

    On CPU: the key/value cache size, and OpenMP threads as many as the engine's CPUs, not pinned to
    cores (a node runs several engines — the teacher, a student replica, eval workers — and vLLM's
    default pins each to every core of the node)."""
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if not engine.num_gpus:
        env.update({"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "OMP_NUM_THREADS": str(max(1, int(engine.num_cpus)))})
    return env


def engine_kwargs(folder: str, engine: Engine) -> dict[str, Any]:
    """vLLM engine arguments from the Engine config (the same for the async engine and the server)."""
    on_gpu = engine.num_gpus > 0
    kwargs: dict[str, Any] = {
        "model": folder,
        "dtype": "bfloat16" if engine.dtype == "auto" else engine.dtype,
        "max_model_len": max_model_len(folder, engine),
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": (not on_gpu) if engine.enforce_eager is None else engine.enforce_eager,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_logprobs": 20,
        "generation_config": "vllm",  # the model folder's sampling defaults do not override a request's
        "disable_log_stats": True,
    }
    if on_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if engine.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"  # one Ray worker per GPU, in the caller's placement group
    return kwargs


# vLLM accepts these max_lora_rank values only (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter: str) -> int:
    """The largest rank of a PEFT adapter folder's layers (`r`, or a larger one in `rank_pattern`)."""
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def lora_kwargs(rank: int) -> dict[str, Any]:
    """vLLM engine arguments for serving one LoRA adapter of this rank on the base model.

    Raises:
        ValueError: the rank is above what vLLM serves (512).
    """
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise ValueError(f"the adapter's rank {rank} is above {LORA_RANKS[-1]}, the largest vLLM's LoRA serves; serve "
                         "the merged export (serve.student_adapter: false) or train with a smaller students[].lora.rank")
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": 1}


def max_model_len(folder: str, engine: Engine) -> int:
    """`engine.max_model_len`, cut to the model's own context (vLLM refuses a longer one)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            own = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError):
        own = None
    return min(engine.max_model_len, int(own)) if own else engine.max_model_len


class VllmEngine:
    """A model in vLLM's AsyncLLM, answering chats with token logprobs.

    With `adapter` (a PEFT adapter folder trained on `folder`), LoRA is enabled and every request
    carries the adapter: the answers are the LoRA student's, the weights in memory its base's."""

    def __init__(self, folder: str, engine: Engine, *, chat_template: str | None = None, adapter: str | None = None):
        from transformers import AutoTokenizer

        from distill_ray.chat import ensure_chat_template

        os.environ.update(engine_env(engine))
        self.folder, self.settings = folder, engine
        self.lora_request = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(lora_name="student", lora_int_id=1, lora_path=adapter)
        self.max_model_len = max_model_len(folder, engine)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ensure_chat_template(self.tokenizer, chat_template)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True)
        self.thread.start()
        self.llm = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        config = self.llm.model_config.hf_config
        self.parameters = _parameters(config)
        # One token now: a model the engine cannot run (an attention shape its CPU kernels lack) fails
        # here, with its cause, instead of at the first request; and the first batch's warm-up is paid.
        self.generate_batch([[{"role": "user", "content": "Hello"}]], 1)

    async def _start(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(self.folder, self.settings)
        if self.lora_request is not None:
            kwargs.update(lora_kwargs(adapter_rank(self.lora_request.lora_path)))
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    # ------------------------------------------------------------------------------------ protocol
    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> Answer:
        future = asyncio.run_coroutine_threadsafe(self._run(self._ids(messages), max_tokens, temperature), self.loop)
        return await asyncio.wrap_future(future)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[Delta | Answer]:
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_delta(delta: Delta) -> None:
            caller.call_soon_threadsafe(queue.put_nowait, delta)

        future = asyncio.run_coroutine_threadsafe(
            self._run(self._ids(messages), max_tokens, temperature, on_delta), self.loop)
        future.add_done_callback(lambda _: caller.call_soon_threadsafe(queue.put_nowait, _DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            yield future.result()
        finally:
            future.cancel()  # the caller stopped reading: abort the request in the engine

    def generate_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[Answer]:
        async def run_all() -> list[Answer]:
            return list(await asyncio.gather(*(self._run(self._ids(m), max_tokens, 0.0) for m in conversations)))

        return asyncio.run_coroutine_threadsafe(run_all(), self.loop).result()

    def info(self) -> dict[str, Any]:
        return {"engine": "vllm", "parameters": self.parameters, "dtype": str(self.llm.model_config.dtype),
                "enforce_eager": self.llm.model_config.enforce_eager,
                "tensor_parallel_size": self.settings.tensor_parallel_size,
                **({"adapter": self.lora_request.lora_path} if self.lora_request is not None else {})}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.loop.call_soon_threadsafe(llm.shutdown)
            self.llm = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=60)  # the engine's processes are stopped by then

    # ------------------------------------------------------------------------------------- helpers
    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        from distill_ray.chat import prompt_ids

        return prompt_ids(self.tokenizer, messages)

    async def _run(self, ids: list[int], max_tokens: int, temperature: float,
                   on_delta: Callable[[Delta], None] | None = None) -> Answer:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; the engine's max_model_len is {self.max_model_len}")
        params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature, logprobs=0,
                                skip_special_tokens=True)
        final, sent_text, sent_tokens = None, 0, 0
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex,
                                              lora_request=self.lora_request):
            final = output
            if on_delta is not None:
                completion = output.outputs[0]
                text = completion.text
                if len(completion.token_ids) > sent_tokens and not text.endswith("\ufffd"):  # no half character
                    on_delta(Delta(text[sent_text:], _logprobs(completion, sent_tokens)))
                    sent_text, sent_tokens = len(text), len(completion.token_ids)
        completion = final.outputs[0]
        if on_delta is not None and len(completion.token_ids) > sent_tokens:
            on_delta(Delta(completion.text[sent_text:], _logprobs(completion, sent_tokens)))
        return Answer(text=completion.text, logprobs=_logprobs(completion, 0),
                      finish_reason=completion.finish_reason or "stop", prompt_tokens=len(ids),
                      completion_tokens=len(completion.token_ids))


def _logprobs(completion: Any, start: int) -> list[float]:
    """The logprob of each generated token from `start` on (vLLM returns the sampled token's with logprobs=0)."""
    steps = (completion.logprobs or [])[start:]
    return [step[token].logprob for step, token in zip(steps, completion.token_ids[start:], strict=False)
            if token in step]


def _parameters(config: Any) -> int:
    """Parameters of a decoder-only transformer from its config (the engine holds no torch module here)."""
    h, layers = getattr(config, "hidden_size", 0), getattr(config, "num_hidden_layers", 0)
    inter, vocab = getattr(config, "intermediate_size", 4 * h), getattr(config, "vocab_size", 0)
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return int(layers * per_layer + embeddings + h)
