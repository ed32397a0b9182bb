"""The one inference engine: how a model answers wherever distill-ray runs one (the served student,
eval, and the offline teacher's server).

``open_engine(model, engine)`` returns a ``ChatEngine`` for a model spec (a folder, ``smollm2``,
``s3://...`` or a cached Hugging Face id) and the ``Engine`` config section (``serve.engine``,
``eval.engine``, ``teachers[].engine``). Two implementations behind one protocol, chosen by
``engine.backend``:

- ``vllm`` (the default): vLLM's async engine (continuous batching, prefix caching, bf16), its CPU
  build on CPU nodes and its CUDA build on GPU nodes, with tensor parallelism;
- ``transformers``: distill-ray's own batched generator (fp32 on CPU), for machines vLLM has no build
  for, and the one training uses on the weights it holds in memory.

Both render the prompt with the model's own chat template (ChatML when it has none), exactly as
training did, answer greedy at temperature 0, and report each answer's token logprobs: its
confidence (the mean) is what the serve router's safety net and eval's calibration judge.

    engine = open_engine("runs/x/students/base/best", config.serve.engine)
    answer = await engine.generate(messages, max_tokens=16)
    async for piece in engine.stream(messages, max_tokens=64): ...   # Deltas, then the Answer
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from distill_ray.engine.answers import Answer, Delta

__all__ = ["Answer", "ChatEngine", "Delta", "open_engine", "placement_bundles", "ray_options"]

if TYPE_CHECKING:
    from distill_ray.config.schema import Engine


class ChatEngine(Protocol):
    """What serve and eval need of an engine."""

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> Answer:
        """One answer (awaitable from any event loop)."""

    def stream(self, messages: list[dict[str, str]], max_tokens: int,
               temperature: float = 0.0) -> AsyncIterator[Delta | Answer]:
        """Deltas as tokens are decoded, then the whole Answer."""

    def generate_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[Answer]:
        """Greedy answers to many conversations at once (blocking)."""

    def info(self) -> dict:
        """The engine's name, parameters and settings, for stats and reports."""

    def close(self) -> None:
        """Stop the engine and free its memory."""


def open_engine(model: str, engine: Engine, *, chat_template: str | None = None) -> ChatEngine:
    """Load a model into the configured engine.

    Args:
        model: a model spec (see ``distill_ray.models.model_folder``).
        engine: the ``Engine`` config section.
        chat_template: a Jinja chat template for a tokenizer without one (default: ChatML).

    Returns:
        A ready ChatEngine.

    Raises:
        ModelNotFoundError: the model cannot be found locally.
    """
    from distill_ray.models import model_folder

    folder = model_folder(model)
    if engine.backend == "vllm":
        from distill_ray.engine.vllm import VllmEngine

        return VllmEngine(folder, engine, chat_template=chat_template)
    from distill_ray.engine.transformers import TransformersEngine

    return TransformersEngine(folder, engine, chat_template=chat_template)


def ray_options(engine: Engine) -> dict:
    """Ray actor options for a process that runs one engine: its CPUs, GPUs and accelerator type.

    With tensor parallelism vLLM starts one Ray worker per GPU itself (its Ray executor), inside the
    placement group ``placement_bundles`` describes; the actor holding the engine then asks for CPUs only.
    """
    options: dict = {"num_cpus": engine.num_cpus}
    if engine.num_gpus and engine.tensor_parallel_size == 1:
        options["num_gpus"] = engine.num_gpus
    if engine.accelerator_type and engine.tensor_parallel_size == 1:  # else the placement group's GPUs say it
        options["accelerator_type"] = engine.accelerator_type
    return options


def placement_bundles(engine: Engine) -> list[dict[str, float]] | None:
    """The placement group of a tensor-parallel engine: the engine's process, then one GPU per rank."""
    if engine.tensor_parallel_size == 1:
        return None
    gpu = {"GPU": 1.0, **({f"accelerator_type:{engine.accelerator_type}": 0.001} if engine.accelerator_type else {})}
    return [{"CPU": float(engine.num_cpus)}] + [dict(gpu) for _ in range(engine.tensor_parallel_size)]
