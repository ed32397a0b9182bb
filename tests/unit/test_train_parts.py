"""The pieces of `distill-ray train` that need no Ray: layer choice, tokenisation, KD targets and loss,
DeepSpeed configs."""

from __future__ import annotations

import json

import pytest
import torch

from distill_ray.config.schema import DeepSpeed, LayerDrop, Train
from distill_ray.train.data import IGNORE, collate, tokenize
from distill_ray.train.deepspeed_config import deepspeed_config, load_preset
from distill_ray.train.kd import align_top_logprobs, distill_loss
from distill_ray.train.students import kept_layers
from tests.integration.test_offline_teacher import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_kept_layers_like_distilbert():
    assert kept_layers(30, LayerDrop(keep_every=3)) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert kept_layers(30, LayerDrop(keep_every=3, keep_last=False)) == list(range(0, 30, 3))
    assert kept_layers(4, LayerDrop(keep_every=2)) == [0, 2, 3]


def test_loss_only_on_the_answer_and_truncation_is_reported(tokenizer):
    example = {"messages": [{"role": "user", "content": "Where is ORD-100001?"}], "completion": "ORD-100001"}
    row = tokenize(tokenizer, example, max_seq_len=512)
    answer = [t for t in row["labels"] if t != IGNORE]
    assert tokenizer.decode(answer[:-1]) == "ORD-100001" and answer[-1] == tokenizer.eos_token_id
    assert row["labels"][: row["prompt_len"]] == [IGNORE] * row["prompt_len"] and not row["truncated"]
    cut = tokenize(tokenizer, example, max_seq_len=row["prompt_len"] + 2)
    assert cut["truncated"] and len(cut["input_ids"]) == row["prompt_len"] + 2


def _teacher_tokens(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def test_kd_targets_align_with_the_students_tokens(tokenizer):
    tokens = _teacher_tokens(tokenizer, "ORD-100001")
    tops = [[{"token": t, "logprob": -0.1}, {"token": "NONE", "logprob": -2.5}] for t in tokens]
    answer = tokenizer("ORD-100001", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, targets = align_top_logprobs(tokenizer, tokens, json.dumps(tops), {})
    assert ids == answer[:-1] and [pairs[0][0] for pairs in targets] == ids
    # A teacher with another tokenizer (its tokens are not the student's): no targets, plain SFT.
    assert align_top_logprobs(tokenizer, ["ORD-1000", "01"], json.dumps(tops[:2]), {}) is None

    example = {"messages": [{"role": "user", "content": "Where is ORD-100001?"}], "completion": "ORD-100001",
               "tokens": tokens, "top_logprobs": json.dumps(tops)}
    row = tokenize(tokenizer, example, max_seq_len=512, kd_cache={})
    batch = collate([row, {**row, "kd": ""}], tokenizer.pad_token_id)
    first = row["prompt_len"] - 1  # the logits that predict the first answer token
    assert batch["kd_ids"][0, first, 0] == answer[0] and batch["kd_ids"][1].max() == -1


def test_kd_loss_is_lowest_when_the_student_matches_the_teacher():
    vocab, k = 6, 2
    labels = torch.tensor([[IGNORE, 2, 3]])
    kd_ids = torch.full((1, 3, k), -1)
    kd_lp = torch.zeros((1, 3, k))
    kd_ids[0, 0] = torch.tensor([2, 4])
    kd_lp[0, 0] = torch.log(torch.tensor([0.8, 0.2]))
    matching = torch.full((1, 3, vocab), -30.0)
    matching[0, 0, 2], matching[0, 0, 4] = torch.log(torch.tensor(0.8)), torch.log(torch.tensor(0.2))
    other = matching.clone()
    other[0, 0, 2], other[0, 0, 4] = torch.log(torch.tensor(0.2)), torch.log(torch.tensor(0.8))
    ce_only = distill_loss(matching, labels, kd_ids, kd_lp, weight=0.0)
    assert torch.isclose(ce_only, torch.nn.functional.cross_entropy(matching[:, :-1].reshape(-1, vocab),
                                                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE))
    assert distill_loss(matching, labels, kd_ids, kd_lp, 1.0) < distill_loss(other, labels, kd_ids, kd_lp, 1.0)


def test_deepspeed_configs_from_stage_or_preset(tmp_path):
    cpu = deepspeed_config(Train(deepspeed=DeepSpeed(zero_stage=3)), micro_batch=4, world_size=2, total_steps=100)
    assert cpu["zero_optimization"]["stage"] == 3 and cpu["train_batch_size"] == 8 and not cpu["bf16"]["enabled"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    gpu = deepspeed_config(Train(use_gpu=True, deepspeed=DeepSpeed(preset="zero3-offload")), micro_batch=2,
                           world_size=8, total_steps=10)
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_preset(DeepSpeed(preset=str(own)))["zero_optimization"]["stage"] == 1
    with pytest.raises(ValueError, match="train.deepspeed.preset"):
        load_preset(DeepSpeed(preset="zero9"))
