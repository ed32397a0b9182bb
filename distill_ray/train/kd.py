"""Logit distillation on the teacher's top-k: when teacher and student share a tokenizer.

An OpenAI-compatible API returns, for each answer token, the teacher's top-k alternatives with
their logprobs. Where every teacher token is one student token (same tokenizer family, as for a
layer-dropped student of the teacher), the student is also trained towards that distribution:
loss = (1 - w) * cross-entropy on the teacher's answer + w * KD, with KD the cross-entropy from
the teacher's top-k distribution (renormalised over the k) to the student's probabilities of those
k tokens (the KL divergence up to the teacher's entropy, a constant). Rows that do not align fall
back to plain SFT.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def _single_id(tokenizer: PreTrainedTokenizerBase, text: str, cache: dict[str, int | None]) -> int | None:
    if text not in cache:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cache[text] = ids[0] if len(ids) == 1 else None
    return cache[text]


def align_top_logprobs(tokenizer: PreTrainedTokenizerBase, teacher_tokens: list[str] | None,
                       top_logprobs: str | list | None, cache: dict[str, int | None]
                       ) -> tuple[list[int], list[list[tuple[int, float]]]] | None:
    """The teacher's answer as student token ids, and per token the teacher's top-k as (student
    token id, logprob); None unless every teacher token is exactly one student token.

    The ids are the teacher's own tokenisation of its answer (a generated sequence need not be the
    one the tokenizer would pick for the text), so the targets line up token for token.
    """
    tops = json.loads(top_logprobs) if isinstance(top_logprobs, str) else top_logprobs
    if not teacher_tokens or not tops or len(tops) != len(teacher_tokens):
        return None
    ids = [_single_id(tokenizer, t, cache) for t in teacher_tokens]
    if None in ids:
        return None
    out = []
    for alternatives in tops:
        pairs = [(i, float(a["logprob"])) for a in alternatives if (i := _single_id(tokenizer, a["token"], cache)) is not None]
        out.append(pairs)
    return (ids, out) if any(out) else None


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, kd_ids: torch.Tensor | None, kd_logprobs: torch.Tensor | None,
                 weight: float) -> torch.Tensor:
    """(1 - weight) * next-token cross-entropy + weight * top-k KD where targets exist.

    logits [B, T, V]; labels [B, T] (-100 ignored); kd_ids / kd_logprobs [B, T, K]: at position t the
    teacher's top-k for the token at t + 1 (id -1 where none).
    """
    import torch
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100)
    if kd_ids is None or weight <= 0:
        return ce
    ids, teacher = kd_ids[:, :-1], kd_logprobs[:, :-1]
    valid = ids >= 0
    positions = valid.any(-1)
    if not positions.any():
        return ce
    student = F.log_softmax(shift_logits, dim=-1).gather(-1, ids.clamp(min=0))
    teacher = teacher.masked_fill(~valid, float("-inf"))
    p = torch.softmax(teacher, dim=-1).nan_to_num(0.0)
    kd = -(p * student.masked_fill(~valid, 0.0)).sum(-1)
    return (1 - weight) * ce + weight * kd[positions].mean()


def supports_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits for the last positions only (transformers'
    `logits_to_keep`, on Llama, Qwen, Mistral, Gemma and most decoder-only models)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def student_loss(model, batch: dict[str, torch.Tensor], kd_weight: float, window: bool = True) -> torch.Tensor:
    """The training loss of a left-padded batch (`data.collate`): cross-entropy on the answer
    tokens, plus KD where the batch carries teacher top-k targets.

    With `window`, the forward computes logits for the answer window only; the loss is the same as
    on full logits (tests check it), for a fraction of the LM head's compute.
    """
    from distill_ray.train.data import answer_window

    labels = batch["labels"]
    keep = answer_window(labels) if window else labels.size(1)
    extra = {"logits_to_keep": keep} if window else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], **extra).logits
    logits = logits[:, -keep:]
    kd_ids, kd_lp = batch.get("kd_ids"), batch.get("kd_logprobs")
    if kd_ids is not None:
        kd_ids, kd_lp = kd_ids[:, -keep:], kd_lp[:, -keep:]
    return distill_loss(logits, labels[:, -keep:], kd_ids, kd_lp, kd_weight)
