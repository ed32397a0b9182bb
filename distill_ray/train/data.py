"""Training examples from `filtered/`: what the student sees (`chat.student_messages`), tokenised with its
chat template.

The student is trained on the task's instructions (as the system turn) and the prompt, without the
teacher's few-shot turns: it learns to answer the way a client will call it. The loss covers the
completion tokens only (prompt tokens get the label -100).
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

from distill_ray.chat import prompt_ids, student_messages
from distill_ray.config.schema import PipelineConfig
from distill_ray.errors import BadInput
from distill_ray.storage import Workdir
from distill_ray.train.kd import IGNORE, align_top_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TrainDataError(BadInput, ValueError):
    """The training data cannot be built (exit 2)."""


def load_examples(config: PipelineConfig, workdir: Workdir) -> dict[str, list[dict[str, Any]]]:
    """Kept answers by split: one example per prompt, from the first teacher (config order) that
    has a kept answer for it (sample 0 first); with `train.prefer_references`, a training prompt's
    reference replaces the teacher's answer (and brings back a prompt the filters dropped). Holdout
    rows are for evaluation only and keep the teacher's answers."""
    table = workdir.read_table("filtered", "rows")
    order = {t.name: i for i, t in enumerate(config.teachers)}
    gold = config.train.prefer_references
    best: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        labelled = gold and row["split"] == "train" and row["reference"] is not None
        if not row["kept"] and not labelled:
            continue
        rank = (order.get(row["teacher"], len(order)), row["sample"])
        if row["id"] not in best or rank < best[row["id"]]["_rank"]:
            best[row["id"]] = {**row, "_rank": rank}
    out: dict[str, list[dict[str, Any]]] = {"train": [], "holdout": []}
    for row in sorted(best.values(), key=lambda r: r["id"]):
        example = {
            "id": row["id"], "category": row["category"], "reference": row["reference"],
            "teacher": row["teacher"], "messages": student_messages(config.task, row["messages"]),
            "completion": row["completion"], "tokens": row.get("tokens"), "top_logprobs": row.get("top_logprobs"),
            "target": "teacher",
        }
        if gold and row["split"] == "train" and row["reference"] is not None:
            # The label, not the teacher: no teacher tokens to distil from (plain SFT on this row).
            example.update({"completion": row["reference"], "tokens": None, "top_logprobs": None, "target": "reference"})
        out[row["split"]].append(example)
    return out


def tokenize(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], max_seq_len: int,
             kd_cache: dict[str, int | None] | None = None) -> dict[str, Any]:
    """input_ids and labels (prompt masked) of one example, cut to max_seq_len (`truncated` says so).

    The completion ends with the tokenizer's end-of-turn token so the student learns to stop. With
    `kd_cache` (logit distillation), `kd_pos`/`kd_ids`/`kd_logprobs` hold the teacher's top-k for the
    answer tokens the teacher's tokens align with (empty when they do not).
    """
    prompt = prompt_ids(tokenizer, example["messages"])
    aligned = None
    if kd_cache is not None:
        aligned = align_top_logprobs(tokenizer, example.get("tokens"), example.get("top_logprobs"), kd_cache)
    body = aligned[0] if aligned else tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    answer = body + [tokenizer.eos_token_id]
    ids = prompt + answer
    labels = [IGNORE] * len(prompt) + answer
    truncated = len(ids) > max_seq_len
    out = {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "truncated": truncated,
           "prompt_len": len(prompt)}
    if kd_cache is not None:
        tops = aligned[1] if aligned else []
        # The logits at position p - 1 predict the token at p.
        keep = [(len(prompt) + j - 1, pairs) for j, pairs in enumerate(tops) if pairs and len(prompt) + j < max_seq_len]
        # One JSON string column: Arrow blocks of rows with and without targets share one type.
        out["kd"] = json.dumps([[p, [i for i, _ in pairs], [lp for _, lp in pairs]] for p, pairs in keep]) if keep else ""
    return out


def bucketed(rows: list[dict[str, Any]], batch_size: int, seed: int) -> list[dict[str, Any]]:
    """Order rows so each run of `batch_size` has similar lengths (less padding), batches shuffled."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    window = batch_size * 16
    batches = []
    for start in range(0, len(rows), window):
        chunk = sorted(rows[start:start + window], key=lambda r: len(r["input_ids"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [row for batch in batches for row in batch]


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-padded tensors: input_ids, attention_mask, position_ids, labels (and KD targets).

    Left padding puts every answer at the end of its row, so the logits the loss needs are the last
    `kd.answer_window(labels)` positions: the LM head (a large share of a small model's compute, with a
    50k vocabulary) runs on those only. position_ids count from each row's first real token.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n:] = torch.tensor(r["input_ids"])
        labels[i, width - n:] = torch.tensor(r["labels"])
        mask[i, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    targets = [json.loads(r["kd"]) if r.get("kd") else [] for r in rows]
    k = max((len(ids) for t in targets for _, ids, _ in t), default=0)
    if k:
        kd_ids = torch.full((len(rows), width, k), -1, dtype=torch.long)
        kd_lp = torch.zeros((len(rows), width, k), dtype=torch.float32)
        for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
            offset = width - len(r["input_ids"])
            for pos, ids, lps in t:
                kd_ids[i, offset + pos, : len(ids)] = torch.tensor(ids)
                kd_lp[i, offset + pos, : len(lps)] = torch.tensor(lps)
        batch.update({"kd_ids": kd_ids, "kd_logprobs": kd_lp})
    return batch


def collate_packed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A padding-free batch: the rows one after another in a single sequence, position_ids restarting
    at 0 for each row and no attention mask, from which transformers builds a block-diagonal causal
    mask (each token attends within its own row only; Flash-Attention kernels take the same layout on
    GPU). No compute goes to padding. `logit_index` holds the positions whose next token is an answer
    token: the only logits the loss needs (the position before a row's first token is the previous
    row's last, whose next token is a prompt token: never a target across rows).
    """
    import torch

    ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)[None]
    labels = torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(len(r["input_ids"])) for r in rows])[None]
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels,
             "logit_index": (labels[0, 1:] != IGNORE).nonzero().flatten()}
    targets = [json.loads(r["kd"]) if r.get("kd") else [] for r in rows]
    k = max((len(i) for t in targets for _, i, _ in t), default=0)
    if k:
        width = ids.size(1)
        kd_ids = torch.full((1, width, k), -1, dtype=torch.long)
        kd_lp = torch.zeros((1, width, k), dtype=torch.float32)
        offset = 0
        for r, t in zip(rows, targets, strict=True):
            for pos, i, lps in t:
                kd_ids[0, offset + pos, : len(i)] = torch.tensor(i)
                kd_lp[0, offset + pos, : len(lps)] = torch.tensor(lps)
            offset += len(r["input_ids"])
        batch.update({"kd_ids": kd_ids, "kd_logprobs": kd_lp})
    return batch
