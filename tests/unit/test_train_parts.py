"""The pieces of `distill-ray train` that need no Ray: layer choice, tokenisation, KD targets and loss,
DeepSpeed configs."""

from __future__ import annotations

import json

import pytest
import torch

from distill_ray.config.schema import DeepSpeed, LayerDrop, Train
from distill_ray.train.data import collate, tokenize
from distill_ray.train.deepspeed_config import deepspeed_config, load_preset
from distill_ray.train.kd import (
    IGNORE,
    align_top_logprobs,
    answer_window,
    distill_loss,
    student_loss,
    supports_logits_to_keep,
)
from distill_ray.train.students import kept_layers
from tests.helpers.models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_kept_layers_like_distilbert():
    assert kept_layers(30, LayerDrop(keep_every=3)) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert kept_layers(30, LayerDrop(keep_every=3, keep_last=False)) == list(range(0, 30, 3))
    assert kept_layers(4, LayerDrop(keep_every=2)) == [0, 2, 3] == kept_layers(4, LayerDrop())
    assert kept_layers(30, LayerDrop(keep_first=12)) == [*range(12), 29]  # depth pruning of a contiguous block
    # The first 8 and the last 7 (the example's small student: the layers nearest the LM head kept).
    assert kept_layers(30, LayerDrop(keep_first=8, keep_last=7)) == [*range(8), *range(23, 30)]
    with pytest.raises(ValueError, match="not both"):
        LayerDrop(keep_every=2, keep_first=3)


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
    short = tokenize(tokenizer, {**example, "messages": [{"role": "user", "content": "ORD-100001?"}]}, 512, kd_cache={})
    batch = collate([row, {**short, "kd": ""}, short], tokenizer.pad_token_id)
    first = row["prompt_len"] - 1  # the logits that predict the first answer token (the longest row: no padding)
    assert batch["kd_ids"][0, first, 0] == answer[0] and batch["kd_ids"][1].max() == -1
    pad = len(row["input_ids"]) - len(short["input_ids"])  # left padding shifts the shorter row's targets
    assert pad > 0 and batch["kd_ids"][2, pad + short["prompt_len"] - 1, 0] == answer[0]


def test_loss_on_the_answer_window_equals_the_loss_on_full_logits(tokenizer):
    """Left padding + logits for the answer window only: the same loss (and the same per-row loss
    as each row alone, so padding changes nothing) as full logits."""
    torch.manual_seed(0)
    model = tiny_model(tokenizer.vocab_size, tokenizer.eos_token_id).eval()
    assert supports_logits_to_keep(model)
    rows = [tokenize(tokenizer, {"messages": [{"role": "user", "content": text}], "completion": answer}, 512)
            for text, answer in (("Where is my parcel, order ORD-100001? It is late.", "ORD-100001"),
                                 ("Refund?", "NONE"), ("Change my email", "NONE, no order number"))]
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][1:, 0].any()  # left-padded
    window = answer_window(batch["labels"])
    assert window == max(len(r["input_ids"]) - r["prompt_len"] for r in rows) + 1 < batch["labels"].size(1)
    with torch.no_grad():
        windowed = student_loss(model, batch, kd_weight=0.0)
        full = student_loss(model, batch, kd_weight=0.0, window=False)
        assert torch.isclose(windowed, full, atol=1e-5)
        total = sum(student_loss(model, collate([r], tokenizer.pad_token_id), 0.0) * (len(r["input_ids"]) - r["prompt_len"])
                    for r in rows)
        tokens = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
        assert torch.isclose(windowed, total / tokens, atol=1e-4)


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


def test_every_step_learns_from_the_first_one():
    """DeepSpeed gives the first two steps warmup_min_lr: it must not be 0 (a quarter of an 8-step run would
    change nothing); `lr_schedule: constant` has no scheduler at all."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    params = deepspeed_config(Train(learning_rate=1e-3), micro_batch=4, world_size=2, total_steps=8)["scheduler"]["params"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = WarmupDecayLR(optimizer, **params)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(r > 0 for r in rates) and max(rates) == pytest.approx(1e-3), rates
    assert "scheduler" not in deepspeed_config(Train(lr_schedule="constant"), micro_batch=4, world_size=2, total_steps=8)


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


def test_prefer_references_trains_on_labels_and_brings_back_dropped_rows(tmp_path):
    import pyarrow as pa

    from distill_ray.config import load_config
    from distill_ray.storage import Workdir
    from distill_ray.train.data import load_examples

    def row(i, completion, kept, reference=None, split="train"):
        return {"id": f"p{i}", "split": split, "category": "c", "reference": reference, "teacher": "smollm2",
                "sample": 0, "messages": [{"role": "user", "content": f"m{i}"}], "completion": completion,
                "tokens": ["x"], "top_logprobs": "[]", "kept": kept, "drop_reason": None if kept else "grounded: x"}

    work = Workdir(str(tmp_path / "run"))
    work.write_table(pa.Table.from_pylist([
        row(0, "ORD-1", True), row(1, "ORD-268193", False, reference="NONE"), row(2, "ORD-9", True, reference="ORD-2"),
        row(3, "ORD-268193", False), row(4, "ORD-4", False, reference="ORD-4", split="holdout")]), "filtered", "rows")
    plain = load_examples(load_config(None, [f"workdir={work.uri}"]), work)
    assert [(e["id"], e["completion"]) for e in plain["train"]] == [("p0", "ORD-1"), ("p2", "ORD-9")]
    gold = load_examples(load_config(None, [f"workdir={work.uri}", "train.prefer_references=true"]), work)
    assert [(e["id"], e["completion"], e["target"]) for e in gold["train"]] == [
        ("p0", "ORD-1", "teacher"), ("p1", "NONE", "reference"), ("p2", "ORD-2", "reference")]
    assert gold["train"][1]["tokens"] is None  # no teacher tokens to distil from: plain SFT
    assert gold["holdout"] == plain["holdout"] == []  # holdout rows are never trained on, and p4 was dropped


def _settings(**changes):
    from distill_ray.train.settings import LoopSettings

    train = Train(deepspeed=DeepSpeed(zero_stage=3), num_workers=1)
    base = {"name": "mini", "init_uri": "/models/mini", "workdir": "/work", "out_parts": ("students", "mini"),
            "deepspeed": deepspeed_config(train, micro_batch=2, world_size=1, total_steps=4), "micro_batch": 2,
            "global_batch": 2, "total_steps": 4, "eval_every_steps": 2, "holdout_tokens": [], "eval_prompts": [],
            "metric_name": "normalized_match", "max_new_tokens": 8}
    return LoopSettings(**{**base, **changes})


def test_loop_settings_survive_the_bundles_json_and_bad_ones_are_named(tmp_path):
    from distill_ray.train.settings import LoopSettings, LoopSettingsError
    from distill_ray.train.standalone import main, read_settings, write_bundle

    settings = _settings(lora={"rank": 4}, kd_weight=0.5)
    assert settings.zero_stage == 3  # the DeepSpeed config's own stage: no second copy to contradict it
    write_bundle(str(tmp_path), settings, [{"input_ids": [1, 2], "labels": [-100, 2]}])
    assert read_settings(str(tmp_path)) == settings
    assert LoopSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings  # Ray Train's config

    data = settings.to_json()
    for bad, message in (({**data, "zero_stage": 2}, r"unknown keys \['zero_stage'\]"),
                         ({k: v for k, v in data.items() if k != "total_steps"}, r"missing keys \['total_steps'\]"),
                         ({**data, "micro_batch": "2"}, "micro_batch: '2' is not an integer"),
                         ({**data, "lora": []}, "lora: .* is not an object or null")):
        with pytest.raises(LoopSettingsError, match=message):
            LoopSettings.from_json(bad)
    (tmp_path / "loop.json").write_text(json.dumps({**data, "packing": "yes"}))
    assert main([str(tmp_path)]) == 2  # refused before any process group starts


def test_teacher_and_student_messages():
    from distill_ray.chat import few_shot_turns, strip_few_shot, student_messages, teacher_messages
    from distill_ray.config.schema import Task

    task = Task(instructions="Reply with the order number.", metric="normalized_match",
                few_shot=[{"user": "where is ORD-1?", "assistant": "ORD-1"}])
    prompt = [{"role": "user", "content": "parcel ORD-7 late", "name": "ignored"}]
    system = {"role": "system", "content": "Reply with the order number."}
    assert teacher_messages(task, prompt) == [system, {"role": "user", "content": "where is ORD-1?"},
                                              {"role": "assistant", "content": "ORD-1"},
                                              {"role": "user", "content": "parcel ORD-7 late"}]
    assert student_messages(task, prompt) == [system, {"role": "user", "content": "parcel ORD-7 late"}]
    # A client that still sends the teacher's prompt: the student gets its own.
    assert strip_few_shot(teacher_messages(task, prompt), few_shot_turns(task)) == student_messages(task, prompt)
