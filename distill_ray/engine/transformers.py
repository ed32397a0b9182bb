"""distill-ray's own batched generator (transformers, fp32 on CPU) behind the ChatEngine protocol.

For machines vLLM has no build for, and for the in-memory weights training evaluates. It answers
whole (its batches are decoded together), so a stream is the whole answer as one delta.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from distill_ray.config.schema import Engine
from distill_ray.engine.answers import Answer, Delta


class TransformersEngine:
    """A model in memory behind the batching generator."""

    def __init__(self, folder: str, engine: Engine, *, chat_template: str | None = None):
        import torch

        from distill_ray.chat import ensure_chat_template
        from distill_ray.engine.batcher import BatchGenerator
        from distill_ray.models import load_causal_lm

        torch.set_num_threads(max(1, int(os.environ.get("DISTILL_STUDENT_THREADS", engine.num_cpus))))
        dtype = {"auto": torch.bfloat16 if engine.num_gpus else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[engine.dtype]
        self.model, self.tokenizer = load_causal_lm(folder, dtype=dtype)
        if engine.num_gpus:
            self.model.to("cuda")
        ensure_chat_template(self.tokenizer, chat_template)
        self.settings = engine
        self.generator = BatchGenerator(self.model, self.tokenizer, max_batch=engine.max_num_seqs, batch_wait_ms=5.0)
        self.generator.start()
        self.parameters = sum(p.numel() for p in self.model.parameters())

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> Answer:
        from distill_ray.engine.batcher import GenerationRequest

        ids = self._ids(messages)
        result = await asyncio.wrap_future(self.generator.submit(
            GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=float(temperature or 0.0))))
        return _answer(ids, result)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[Delta | Answer]:
        answer = await self.generate(messages, max_tokens, temperature)
        yield Delta(answer.text, list(answer.logprobs))
        yield answer

    def generate_batch(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[Answer]:
        from distill_ray.engine.batcher import GenerationRequest

        out = []
        step = self.settings.max_num_seqs
        for i in range(0, len(conversations), step):
            ids = [self._ids(m) for m in conversations[i:i + step]]
            results = self.generator.generate([GenerationRequest(prompt_ids=p, max_tokens=max_tokens) for p in ids])
            out += [_answer(p, r) for p, r in zip(ids, results, strict=True)]
        return out

    def info(self) -> dict[str, Any]:
        return {"engine": "transformers", "parameters": self.parameters, "dtype": str(self.model.dtype),
                **self.generator.stats()}

    def close(self) -> None:
        self.generator.stop()

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        from distill_ray.chat import prompt_ids

        return prompt_ids(self.tokenizer, messages)


def _answer(ids: list[int], result: Any) -> Answer:
    return Answer(text=result.text, logprobs=list(result.logprobs), finish_reason=result.finish_reason,
                  prompt_tokens=len(ids), completion_tokens=len(result.token_ids))
