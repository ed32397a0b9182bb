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

IGNORE = -100  # the label of a token the loss skips (a prompt token, padding)


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


def loss_sums(logits: torch.Tensor, targets: torch.Tensor, kd_ids: torch.Tensor | None = None,
              kd_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed losses over aligned predictions: logits [..., V] at the positions that predict `targets`
    [...] (IGNORE skipped); kd_ids / kd_logprobs [..., K]: the teacher's top-k for the same target (id -1
    where none). Returns (cross-entropy summed over the targets, KD summed over the positions with
    teacher targets, or None without KD).

    Sums, not means, so that the caller divides by the answer tokens of the whole global batch: k
    micro-batches then give exactly the gradient of one k-times batch (gradient accumulation), however
    their token counts differ.
    """
    import torch
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.size(-1)).float()
    ce = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    if kd_ids is None:
        return ce, None
    ids = kd_ids.reshape(-1, kd_ids.size(-1))
    valid = ids >= 0
    positions = valid.any(-1)
    if not positions.any():
        return ce, flat.new_zeros(())
    student = F.log_softmax(flat[positions], dim=-1).gather(-1, ids[positions].clamp(min=0))
    teacher = kd_logprobs.reshape(-1, kd_logprobs.size(-1))[positions].masked_fill(~valid[positions], float("-inf"))
    p = torch.softmax(teacher, dim=-1).nan_to_num(0.0)
    kd = -(p * student.masked_fill(~valid[positions], 0.0)).sum()
    return ce, kd


def loss_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(answer tokens, positions with teacher top-k targets) of a collated batch: what `loss_sums`
    sums over, counted before the forward so that a whole global batch's totals can be all-reduced."""
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != IGNORE).sum())
    kd_ids = batch.get("kd_ids")
    kd = int((kd_ids[:, :-1] >= 0).any(-1).sum()) if kd_ids is not None else 0
    return tokens, kd


def combine(ce: torch.Tensor, kd: torch.Tensor | None, weight: float, tokens: float, kd_positions: float) -> torch.Tensor:
    """(1 - weight) * CE per answer token + weight * KD per position with targets (CE alone without KD)."""
    if kd is None or weight <= 0 or kd_positions <= 0:
        return ce / max(tokens, 1)
    return (1 - weight) * ce / max(tokens, 1) + weight * kd / kd_positions


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, kd_ids: torch.Tensor | None, kd_logprobs: torch.Tensor | None,
                 weight: float) -> torch.Tensor:
    """(1 - weight) * next-token cross-entropy + weight * top-k KD where targets exist (means over the batch).

    logits [B, T, V]; labels [B, T] (IGNORE skipped); kd_ids / kd_logprobs [B, T, K]: at position t the
    teacher's top-k for the token at t + 1 (id -1 where none).
    """
    shift = slice(None, -1)
    use_kd = kd_ids is not None and weight > 0
    ce, kd = loss_sums(logits[:, shift], labels[:, 1:], kd_ids[:, shift] if use_kd else None,
                       kd_logprobs[:, shift] if use_kd else None)
    tokens = int((labels[:, 1:] != IGNORE).sum())
    kd_positions = int((kd_ids[:, shift] >= 0).any(-1).sum()) if use_kd else 0
    return combine(ce, kd, weight, tokens, kd_positions)


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions' logits a left-padded batch needs: from the one before its
    earliest label to the end (logits at t predict the token at t + 1)."""
    labelled = (labels != IGNORE).any(0).nonzero()
    if len(labelled) == 0:
        return 1
    return labels.size(1) - int(labelled[0]) + 1


def supports_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits for the last positions only (transformers'
    `logits_to_keep`, on Llama, Qwen, Mistral, Gemma and most decoder-only models)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT (LoRA) model's own
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def student_loss(model, batch: dict[str, torch.Tensor], kd_weight: float, window: bool = True,
                 norm: tuple[float, float] | None = None) -> torch.Tensor:
    """The training loss of a collated batch (`data.collate`, left-padded, or `data.collate_packed`):
    cross-entropy on the answer tokens, plus KD where the batch carries teacher top-k targets.

    The logits are computed only where the loss needs them: for a left-padded batch the answer window
    (`window`), for a packed one the answer positions (`logit_index`); the loss is the same as on full
    logits (tests check it), for a fraction of the LM head's compute (a large share of a small model's,
    with a 50k vocabulary). `norm`: the (answer tokens, KD positions) to divide by, those of the whole
    global batch under gradient accumulation; default this batch's own.
    """
    labels = batch["labels"]
    kd_ids, kd_lp = batch.get("kd_ids"), batch.get("kd_logprobs")
    use_kd = kd_ids is not None and kd_weight > 0
    if "logit_index" in batch:  # packed: one row, rows after one another
        index = batch["logit_index"]
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       **({"logits_to_keep": index} if window else {})).logits
        logits = logits[0] if window else logits[0, index]
        ce, kd = loss_sums(logits, labels[0, index + 1], kd_ids[0, index] if use_kd else None,
                           kd_lp[0, index] if use_kd else None)
    else:
        keep = answer_window(labels) if window else labels.size(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], **({"logits_to_keep": keep} if window else {})).logits
        shift = slice(-keep, -1)
        ce, kd = loss_sums(logits[:, -keep:-1], labels[:, -keep + 1:], kd_ids[:, shift] if use_kd else None,
                           kd_lp[:, shift] if use_kd else None)
    tokens, kd_positions = norm if norm is not None else loss_counts(batch)
    return combine(ce, kd, kd_weight, tokens, kd_positions)
