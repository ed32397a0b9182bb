"""What the training loop scores on the holdout at each eval (rank 0): the loss on the tokenised holdout
rows, and the training metric on greedy answers to a sample of holdout prompts."""

from __future__ import annotations

from typing import Any

import torch

from distill_ray.train.data import collate
from distill_ray.train.kd import IGNORE, answer_window, supports_logits_to_keep
from distill_ray.train.settings import LoopSettings


@torch.no_grad()
def score_loss(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> float | None:
    """Mean cross-entropy per answer token of the tokenised holdout `rows` (None without rows)."""
    if not rows:
        return None
    total, count = 0.0, 0
    window = supports_logits_to_keep(model)
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], tokenizer.pad_token_id).items()}
        labels = batch["labels"]
        keep = answer_window(labels) if window else labels.size(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], **({"logits_to_keep": keep} if window else {})).logits
        logits, labels = logits[:, -keep:-1], labels[:, -keep + 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def score_metric(model, tokenizer, s: LoopSettings) -> float | None:
    """The mean metric (`s.metric_name`) of greedy answers to `s.eval_prompts` against their targets."""
    from distill_ray.engine.batcher import BatchGenerator, GenerationRequest
    from distill_ray.metrics import metric

    prompts = s.eval_prompts
    if not prompts:
        return None
    score = metric(s.metric_name, s.metric_pattern)
    use_cache = model.config.use_cache
    model.config.use_cache = True  # training turns it off; generation wants its KV cache
    try:
        generator = BatchGenerator(model, tokenizer, max_batch=16)
        requests = [GenerationRequest(prompt_ids=p["prompt_ids"], max_tokens=s.max_new_tokens) for p in prompts]
        answers = [r.text for i in range(0, len(requests), 16) for r in generator.generate(requests[i:i + 16])]
    finally:
        model.config.use_cache = use_cache
    return sum(score(a, p["target"]) for a, p in zip(answers, prompts, strict=True)) / len(prompts)
