"""The served student: which deployment holds it, and how the router talks to it.

With `serve.engine.backend: vllm` (the default) the student is Ray's own LLM deployment
(`ray.serve.llm`: `LLMConfig` / `LLMServer`, vLLM's engine; its CPU build here, the CUDA build with
`serve.engine.num_gpus`, an `accelerator_type` and tensor parallelism through its placement group),
built from the same engine settings eval and the teacher use (`distill_ray.engine.vllm`). With
`backend: transformers` it is `StudentServer` (below), distill-ray's own batched generator.

With `serve.student_adapter: true` (a LoRA student, vLLM) the engine holds the student's base
(`students/<name>/init/`) and its adapter (`best/adapter/`) as a LoRA module named after the student:
the router asks for the student by name, so every request carries the adapter; the base alone is
`<name>-base`, which nothing asks for.

The router holds a `StudentClient` for either: `generate` returns one answer with its confidence
(the mean token logprob), `stream` yields pieces as they are decoded (text and the logprobs of their
tokens), then the whole answer marked `done`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from distill_ray.config.schema import Serve


def llm_deployment(model_uri: str, name: str, s: Serve, replica_options: dict[str, Any]):
    """The student as a `ray.serve.llm` LLMServer deployment named `student`.

    Args:
        model_uri: the checkpoint (`students/<name>/best`: a local folder or an s3:// prefix).
        name: the student's name (the model id the router asks for).
        s: the `serve:` section (its `engine`; `student_adapter`: the base and the adapter, see
            `adapter_paths`, instead of the merged checkpoint).
        replica_options: num_replicas or autoscaling_config, max_replicas_per_node.
    """
    import logging

    from ray.serve.llm import LLMConfig, build_llm_deployment

    from distill_ray.engine.vllm import adapter_rank, engine_env, engine_kwargs, lora_kwargs
    from distill_ray.storage import is_s3

    engine = s.engine
    model_id, adapter = name, None
    if s.student_adapter:
        model_uri, adapter = adapter_paths(model_uri)
        model_id = f"{name}-base"
    kwargs = engine_kwargs(model_uri, engine) if not is_s3(model_uri) else engine_kwargs("", engine)
    kwargs.pop("model")
    kwargs.pop("disable_log_stats")  # Ray's LLM deployment exports the engine's metrics, which need them
    if adapter is not None:  # vLLM's static LoRA module: loaded at start, chosen by the request's model name
        kwargs.update(lora_kwargs(adapter_rank(adapter)))
        kwargs["lora_modules"] = [{"name": name, "path": adapter, "base_model_name": model_id}]
    source: Any = {"bucket_uri": model_uri} if is_s3(model_uri) else model_uri
    if engine.num_gpus:
        gpu = {"GPU": 1.0}
        bundles = [{"CPU": float(engine.num_cpus), **gpu}] + [dict(gpu) for _ in range(engine.tensor_parallel_size - 1)]
    else:
        bundles = [{"CPU": float(engine.num_cpus)}]
    if s.student_resources:
        bundles[0] = {**bundles[0], **s.student_resources}
    config = LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        engine_kwargs=kwargs,
        accelerator_type=engine.accelerator_type,
        # The engine's own CPU (and GPUs) are the placement group's; the replica actor itself asks for
        # none, or on a 2-CPU node it would wait forever beside the router.
        placement_group_config={"bundles": bundles, "strategy": "STRICT_PACK"},
        deployment_config={"ray_actor_options": {"num_cpus": 0}},
        runtime_env={"env_vars": engine_env(engine)},
    )
    logging.getLogger("ray.serve.ray.llm").setLevel(logging.WARNING)  # it prints every deployment option at INFO
    return build_llm_deployment(config, name_prefix="", override_serve_options={"name": "student", **replica_options})


def adapter_paths(best_uri: str) -> tuple[str, str]:
    """(base, adapter) of a LoRA student's checkpoint `students/<name>/best`: its starting weights
    `students/<name>/init` and the adapter trained on them, `students/<name>/best/adapter`."""
    best = best_uri.rstrip("/")
    return f"{best.rsplit('/', 1)[0]}/init", f"{best}/adapter"


class StudentClient:
    """The router's side of the student deployment, for either kind."""

    def __init__(self, handle: Any, name: str, ray_llm: bool):
        self.handle, self.name, self.ray_llm = handle, name, ray_llm
        self.request_type = None
        if ray_llm:  # imported once here: importing vLLM takes seconds, which a request must not wait for
            try:
                from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            except ImportError:  # vLLM before 0.3x kept it in one module
                from vllm.entrypoints.openai.protocol import ChatCompletionRequest
            self.request_type = ChatCompletionRequest

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
        """One whole answer: text, confidence, finish_reason, prompt_tokens, completion_tokens."""
        if not self.ray_llm:
            return await self.handle.generate.remote(messages, max_tokens, temperature)
        out = None
        async for item in self.handle.options(stream=True).chat.remote(self._request(messages, max_tokens,
                                                                                      temperature, False)):
            out = item
        body = _as_dict(out)
        choice = body["choices"][0]
        logprobs = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        usage = body.get("usage") or {}
        return {"text": (choice["message"].get("content") or "").strip(),
                "confidence": sum(logprobs) / len(logprobs) if logprobs else None,
                "finish_reason": choice.get("finish_reason") or "stop",
                "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0)}

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float):
        """A cancellable stream of {"text", "logprobs"} pieces, then the whole answer with "done": True."""
        if not self.ray_llm:
            return self.handle.options(stream=True).stream.remote(messages, max_tokens, temperature)
        return _LLMStream(self.handle.options(stream=True).chat.remote(
            self._request(messages, max_tokens, temperature, True)))

    def _request(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool):
        return self.request_type(model=self.name, messages=messages, max_tokens=max_tokens,
                                 temperature=temperature, logprobs=True, stream=stream,
                                 stream_options={"include_usage": True} if stream else None)


async def warm_up(name: str, ray_llm: bool) -> float:
    """One short request through the deployed student, so that the first client does not pay the
    engine's first-batch warm-up (seconds on CPU); returns its seconds."""
    from distill_ray.serve.control import APP_NAME

    client = StudentClient(serve.get_deployment_handle("student", app_name=APP_NAME), name, ray_llm)
    start = time.perf_counter()
    await client.generate([{"role": "user", "content": "Hello"}], 2, 0.0)
    return time.perf_counter() - start


class _LLMStream:
    """LLMServer's SSE lines (in batches) as the pieces `StudentServer.stream` yields."""

    def __init__(self, response: Any):
        self.response = response

    def cancel(self) -> None:
        self.response.cancel()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[dict[str, Any]]:
        text, logprobs, finish, usage = [], [], None, {}
        async for batch in self.response:
            for line in batch if isinstance(batch, list) else [batch]:
                chunk = _sse_json(line)
                if chunk is None:
                    continue
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
                    finish = choice.get("finish_reason") or finish
                    if piece or lps:
                        text.append(piece)
                        logprobs += lps
                        yield {"text": piece, "logprobs": lps}
        yield {"done": True, "text": "".join(text).strip(), "finish_reason": finish or "stop",
               "confidence": sum(logprobs) / len(logprobs) if logprobs else None,
               "prompt_tokens": usage.get("prompt_tokens", 0),
               "completion_tokens": usage.get("completion_tokens", len(logprobs))}


def _sse_json(line: Any) -> dict[str, Any] | None:
    if not isinstance(line, str):
        body = _as_dict(line)  # an ErrorResponse object
        raise RuntimeError(f"the student failed: {body.get('error') or body}")
    line = line.strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[6:])
    if "error" in chunk and "choices" not in chunk:
        raise RuntimeError(f"the student failed: {chunk['error']}")
    return chunk


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        body = item
    elif hasattr(item, "model_dump"):
        body = item.model_dump()
    else:
        raise RuntimeError(f"the student answered {type(item).__name__}: {str(item)[:200]}")
    if "choices" not in body:
        raise RuntimeError(f"the student failed: {body.get('error') or body.get('message') or body}")
    return body


@serve.deployment(name="student", ray_actor_options={"num_cpus": 1})
class StudentServer:
    """The student checkpoint in distill-ray's own deployment, with `serve.engine.backend: transformers`
    (any ChatEngine works here); answers with their confidence, whole (`generate`) or as they are
    decoded (`stream`)."""

    def __init__(self, model_uri: str, name: str, engine: dict[str, Any] | None = None):
        from distill_ray.config.schema import Engine
        from distill_ray.engine import open_engine

        self.name = name
        self.engine = open_engine(model_uri, Engine.model_validate(engine or {}))
        self.parameters = self.engine.info()["parameters"]

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0
                       ) -> dict[str, Any]:
        start = time.perf_counter()
        answer = await self.engine.generate(messages, max_tokens, temperature)
        return {"text": answer.text.strip(), "confidence": answer.confidence, "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                "compute_ms": (time.perf_counter() - start) * 1000}

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0):
        """{"text", "logprobs"} pieces as the engine decodes them, then the whole answer with "done": True."""
        from distill_ray.engine import Answer

        start = time.perf_counter()
        async for item in self.engine.stream(messages, max_tokens, temperature):
            if isinstance(item, Answer):
                yield {"done": True, "text": item.text.strip(), "confidence": item.confidence,
                       "finish_reason": item.finish_reason, "prompt_tokens": item.prompt_tokens,
                       "completion_tokens": item.completion_tokens, "compute_ms": (time.perf_counter() - start) * 1000}
            else:
                yield {"text": item.text, "logprobs": item.logprobs}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "parameters": self.parameters, "pid": os.getpid(), **self.engine.info()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
