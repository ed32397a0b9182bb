"""`distill-ray train` on GPUs: use_gpu, bf16, ZeRO-3 over NCCL. Skipped without CUDA.

Run on a GPU machine (tests/gpu/README.md):
    .venv/bin/python -m pytest tests/gpu -q -s
It prints tokens/s, an MFU estimate and the peak GPU memory of the run, for the note.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.gpu import filtered_workdir
from tests.helpers.gpu import has_smollm2 as _has_smollm2
from tests.helpers.gpu import tiny_gpu_student as _tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, NCCL, ZeRO-3 on GPUs)")]

GPU_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def test_zero3_bf16_on_gpus(ray_gpu, tmp_path, capsys):
    from distill_ray.cli import main
    from tests.helpers.steps import train_config as _config

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
