"""`distill-ray train` on GPUs: use_gpu, bf16, ZeRO-3 over NCCL. Skipped without CUDA.

Run on a GPU machine (tests/gpu/README.md):
    .venv/bin/python -m pytest tests/gpu -q -s
It prints tokens/s, an MFU estimate and the peak GPU memory of the run, for the note.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, NCCL, ZeRO-3 on GPUs)")]

GPU_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=torch.cuda.device_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level="ERROR")
    yield
    ray.shutdown()


def filtered_workdir(tmp_path):
    """prompts -> generate (the scripted teacher) -> filter of the example log, in tmp_path/filtered."""
    from distill_ray.config import load_config
    from distill_ray.filters.step import run_filter
    from distill_ray.prompts.step import run_prompts
    from distill_ray.teacher.step import run_generate
    from tests.conftest import ROOT
    from tests.fakes.openai_server import FakeTeacher, FakeTeacherConfig

    log = tmp_path / "log.jsonl"
    shutil.copy(ROOT / "jobs" / "data" / "support_orders.jsonl", log)
    work = tmp_path / "filtered"
    with FakeTeacher(FakeTeacherConfig()) as teacher:
        config = load_config(str(ROOT / "jobs" / "configs" / "support_orders.yaml"), [
            f"workdir={work}", f"prompts.source={log}", "prompts.size=400", f"teachers.0.base_url={teacher.base_url}",
            "teachers.0.launch=null", "teachers.0.max_concurrency=64"])
        run_prompts(config, echo=lambda _: None)
        run_generate(config, echo=lambda _: None)
    run_filter(config, echo=lambda _: None)
    return work


def test_zero3_bf16_on_gpus(ray_gpu, tmp_path, capsys):
    from distill_ray.cli import main
    from tests.integration.test_train import _config, student_folder  # noqa: F401

    work = filtered_workdir(tmp_path)

    gpus = torch.cuda.device_count()
    student = tmp_path / "student"
    from distill_ray.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2") if _has_smollm2() else _tiny(student)
    if _has_smollm2():
        model.save_pretrained(student)
        tokenizer.save_pretrained(student)
    params = sum(p.numel() for p in model.parameters())
    (tmp_path / "job").mkdir()
    path = _config(tmp_path / "job", work, student, num_workers=gpus, use_gpu=True,
                   deepspeed={"zero_stage": 3}, epochs=1, batch_size=16 * gpus, max_steps=30, eval_every_steps=15)
    assert main(["train", str(path)]) == 0
    history = [json.loads(x) for x in (tmp_path / "job" / "run" / "students" / "mini" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["holdout_loss"] < history[0]["holdout_loss"]
    tokens_per_s = history[-1]["tokens_per_s"]
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = 6 * params * tokens_per_s / (peak * gpus) if peak else None
    mfu_text = f"MFU ~{mfu:.2%}" if mfu else "MFU n/a (unknown GPU peak)"
    print(f"\nGPU train: {gpus} x {name}, ZeRO-3 bf16, {params / 1e6:.0f}M params (before layer drop): "
          f"{tokens_per_s:.0f} tokens/s, {mfu_text}, rank 0 peak memory {history[-1].get('gpu_peak_memory_gb')} GiB")


def _has_smollm2() -> bool:
    from distill_ray.models import find_smollm2_wheel

    return find_smollm2_wheel() is not None


def _tiny(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.integration.test_offline_teacher import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
