"""The training loop without Ray (`python -m distill_ray.train.standalone`, torchrun): real DeepSpeed on CPU
(gloo), a tiny Llama, in subprocesses where `import ray` fails, so the loop is shown to need no Ray.

- ZeRO-3 under zero.Init on 2 ranks: each rank holds half of the weights, and the export equals the weights
  DeepSpeed's own zero_to_fp32 rebuilds from the checkpoint (exactly: fp32 on CPU).
- Gradient accumulation over 2 micro-batches gives the loss curve of one batch twice the size; gradient
  checkpointing and padding-free packing give the loss curve of the plain run. Tolerance: 1e-4 on the losses
  (the loop records them to 4 decimals), 1e-5 on the final weights (float sums in another order).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_ray.config.schema import DeepSpeed, Train
from distill_ray.train.data import tokenize
from distill_ray.train.deepspeed_config import deepspeed_config
from distill_ray.train.settings import LoopSettings
from distill_ray.train.standalone import write_bundle
from tests.conftest import ROOT
from tests.helpers.models import tiny_tokenizer
from tests.helpers.processes import run_without_ray as _without_ray

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _student(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _rows(tokenizer, n: int = 48) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        number = rng.randint(100000, 999999)
        text = "Hi, my parcel never arrived " * rng.randint(1, 3) + f"order {number}"  # lengths vary: padding
        rows.append(tokenize(tokenizer, {"messages": [{"role": "user", "content": text}],
                                         "completion": f"ORD-{number}"}, 128))
    return rows


def _bundle(folder: Path, init: Path, rows: list[dict], *, stage: int = 2, micro: int = 4, accumulate: int = 1,
            world: int = 1, steps: int = 4, checkpointing: bool = False, packing: bool = False,
            lora: dict | None = None) -> Path:
    train = Train(deepspeed=DeepSpeed(zero_stage=stage), learning_rate=3e-3, num_workers=world,
                  gradient_accumulation_steps=accumulate)
    settings = LoopSettings(
        name="t", init_uri=str(init), workdir=str(folder / "work"), out_parts=("students", "t"),
        deepspeed=deepspeed_config(train, micro_batch=micro, world_size=world, total_steps=steps, accumulate=accumulate),
        micro_batch=micro, global_batch=micro * accumulate * world, total_steps=steps,
        eval_every_steps=1 if stage < 3 else 2, holdout_tokens=rows[:8], eval_prompts=[],
        metric_name="normalized_match", max_new_tokens=8, gradient_accumulation_steps=accumulate,
        gradient_checkpointing=checkpointing, packing=packing, lora=lora)
    write_bundle(str(folder), settings, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return folder


def _history(bundle: Path) -> list[dict]:
    lines = (bundle / "work" / "students" / "t" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(bundle / "work" / "students" / "t" / "last" / "model.safetensors")


@pytest.fixture(scope="module")
def single_rank_runs(tmp_path_factory):
    """One process, ZeRO-2, 4 steps of 4 rows: plain, 2 x 2 accumulated, checkpointing, packing; and a LoRA
    student."""
    tmp = tmp_path_factory.mktemp("loop")
    tokenizer = _student(tmp / "init")
    rows = _rows(tokenizer)
    variants = {"plain": {}, "accumulated": {"micro": 2, "accumulate": 2}, "checkpointing": {"checkpointing": True},
                "packed": {"packing": True}, "lora": {"lora": LORA}}
    bundles = {name: _bundle(tmp / name, tmp / "init", rows, **kw) for name, kw in variants.items()}
    script = ("import sys\nfrom distill_ray.train.standalone import run_bundle\n"
              "for b in sys.argv[1:]:\n    run_bundle(b)\n")
    _without_ray(tmp, ["-c", script, *map(str, bundles.values())])
    return {name: (_history(b), _weights(b)) for name, b in bundles.items()}, tmp / "init", bundles


@pytest.mark.parametrize("variant", ["accumulated", "checkpointing", "packed"])
def test_same_loss_curve_as_the_plain_run(single_rank_runs, variant):
    runs, init, _ = single_rank_runs
    (plain, plain_weights), (other, other_weights) = runs["plain"], runs[variant]
    assert [r["step"] for r in other] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for a, b in zip(plain, other, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4, (variant, a, b)
        assert abs(a["holdout_loss"] - b["holdout_loss"]) <= 1e-4, (variant, a, b)
    assert plain[-1]["train_loss"] < plain[0]["train_loss"] - 0.1  # it trained: the curves are not flat
    start = load_file(init / "model.safetensors")
    for name, weight in plain_weights.items():
        assert torch.allclose(weight, other_weights[name], atol=1e-5), (variant, name)
    assert any(not torch.equal(w, start[n]) for n, w in plain_weights.items() if n in start)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """ZeRO-3 on 2 ranks (torchrun), 4 steps of 2 rows per rank: a full student, then a LoRA one, in one
    launch (each rank runs the two bundles in turn)."""
    tmp = tmp_path_factory.mktemp("zero3")
    tokenizer = _student(tmp / "init")
    rows = _rows(tokenizer)
    bundles = {name: _bundle(tmp / name, tmp / "init", rows, stage=3, micro=2, world=2, steps=4, lora=lora)
               for name, lora in (("full", None), ("lora", LORA))}
    script = tmp / "two_bundles.py"
    script.write_text("import json, os, sys\nfrom distill_ray.train.standalone import run_bundle\n"
                      "for b in sys.argv[1:]:\n    state = run_bundle(b)\n"
                      "    if os.environ['RANK'] == '0':\n"
                      "        print(json.dumps({'steps': state['step'], **state['history'][-1]}), flush=True)\n")
    out = _without_ray(tmp, ["-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                             *map(str, bundles.values())])
    summaries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return dict(zip(bundles, summaries, strict=True)), tmp / "init", bundles


def test_zero3_zero_init_on_two_ranks_exports_the_trained_weights(two_rank_runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    summaries, init, bundles = two_rank_runs
    summary, bundle = summaries["full"], bundles["full"]
    assert summary["steps"] == 4 and [r["step"] for r in _history(bundle)] == [2, 4]
    # zero.Init: each rank built only its half of the weights (never the whole model).
    assert summary["model_elements_on_rank"] <= summary["model_elements"] / 2 + 64
    exported = _weights(bundle)
    rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(bundle / "checkpoints" / "latest"), tag="ds")
    start = load_file(init / "model.safetensors")
    assert set(exported) <= set(rebuilt) and len(exported) == len(start)
    for name, weight in exported.items():
        assert torch.equal(weight, rebuilt[name].to(weight.dtype)), name
    assert sum(not torch.equal(exported[n], start[n]) for n in exported) >= len(exported) - 1  # trained


def test_the_gpu_check_script_dry_run_on_cpu(tmp_path):
    """tests/gpu/gpu_check.sh --cpu: the script a borrowed GPU machine runs (ZeRO-3, zero.Init, no Ray), on CPU
    with 2 of SmolLM2's layers and 3 steps."""
    subprocess.run([str(ROOT / "tests" / "gpu" / "prepare.sh"), "--no-wheels"], check=True, capture_output=True,
                   timeout=300)
    out = _without_ray(tmp_path, [str(ROOT / "tests" / "gpu" / "gpu_check.py"), "--cpu"])
    lines = [line for line in out.stdout.splitlines() if line.startswith("gpu_check:")]
    assert "SmolLM2-135M architecture" in lines[0] and "ZeRO-3 with zero.Init" in lines[0] and "no Ray" in lines[0]
    tokens_per_s = float(lines[1].split("gpu_check: ")[1].split(" tokens/s")[0])
    assert tokens_per_s > 0 and "export written: True" in lines[2]


def _assert_lora_exports(bundle: Path, init: Path) -> None:
    """The merged export equals the base with the adapter applied (PEFT), and only adapted layers moved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    last = bundle / "work" / "students" / "t" / "last"
    merged = AutoModelForCausalLM.from_pretrained(last).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init), last / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    start, weights = load_file(init / "model.safetensors"), _weights(bundle)
    moved = {n for n in weights if not torch.equal(weights[n], start[n])}
    assert moved and all(any(f".{t}." in n for t in LORA["target_modules"]) for n in moved), moved


def test_a_lora_student_trains_its_adapters_and_exports_them_merged_and_alone(single_rank_runs):
    runs, init, bundles = single_rank_runs
    history, _ = runs["lora"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    _assert_lora_exports(bundles["lora"], init)


def test_lora_under_zero3_on_two_ranks(two_rank_runs):
    summaries, init, bundles = two_rank_runs
    assert summaries["lora"]["steps"] == 4 and [r["step"] for r in _history(bundles["lora"])] == [2, 4]
    _assert_lora_exports(bundles["lora"], init)
