"""The inference engine on GPUs: vLLM's CUDA build with bf16, alone and under `distill-ray serve`
with the student replica asking Ray for its GPU. Skipped without CUDA (and without vLLM).

Run on a GPU machine with the `gpu` extra installed (tests/gpu/README.md):
    .venv/bin/python -m pytest tests/gpu/test_engine_gpu.py -q -s
It prints the engine's answers/s at batch 32 and the first-chunk / whole-answer time of a stream.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM's CUDA build, bf16)")]
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """SmolLM2 from the offline wheel, as `train` exports a student (a plain Hugging Face folder)."""
    from distill_ray.models import smollm2_dir

    return smollm2_dir()


def test_vllm_bf16_on_one_gpu_answers_with_logprobs(student_dir):
    from distill_ray.config.schema import Engine
    from distill_ray.engine import open_engine

    engine = open_engine(student_dir, Engine(num_gpus=1))  # dtype auto: bf16; compiled with CUDA graphs
    try:
        info = engine.info()
        assert info["engine"] == "vllm" and "bfloat16" in info["dtype"]
        chats = [[{"role": "user", "content": f"Where is my order ORD-{100000 + i}?"}] for i in range(32)]
        t = time.perf_counter()
        answers = engine.generate_batch(chats, 16)
        seconds = time.perf_counter() - t
        assert all(a.text and a.confidence is not None and a.confidence <= 0 for a in answers)

        async def stream() -> tuple[float, float]:
            t0, first = time.perf_counter(), None
            async for _piece in engine.stream([{"role": "user", "content": "Write a long letter."}], 64):
                first = first or time.perf_counter() - t0
            return first, time.perf_counter() - t0

        first, whole = asyncio.run(stream())
        print(f"\nvLLM bf16 on {torch.cuda.get_device_name(0)}: {len(chats) / seconds:.1f} answers/s at batch 32; "
              f"stream first piece {first * 1000:.1f} ms of {whole * 1000:.1f} ms")
        assert first < whole
    finally:
        engine.close()


def test_serve_puts_the_student_replica_on_a_gpu(student_dir, tmp_path):
    import openai
    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.manifest import StepRecord, write_manifest
    from distill_ray.serve.step import deploy
    from distill_ray.storage import Workdir

    workdir = tmp_path / "run"
    (workdir / "students" / "base").mkdir(parents=True)
    os.symlink(student_dir, workdir / "students" / "base" / "best")
    write_manifest(Workdir(str(workdir)), StepRecord("students/base", {}, {}))
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=torch.cuda.device_count(), logging_level="ERROR")
    try:
        config = load_config(None, [
            f"workdir={workdir}", "teachers.0.base_url=http://127.0.0.1:9/v1", "teachers.0.launch=null",
            "students=[{name: base, base_model: smollm2}]", "serve.student=base", "serve.port=8123",
            "serve.auth_token_env=null", "serve.mode=full", "serve.min_confidence=-1000", "serve.engine.num_gpus=1"])
        deploy(config, echo=print)
        client = openai.OpenAI(base_url="http://127.0.0.1:8123/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "Where is ORD-512874?"}], max_tokens=16)
        assert raw.headers["x-served-by"] == "student" and raw.parse().choices[0].message.content
        info = serve.get_deployment_handle("student", app_name="distill").info.remote().result()
        assert info["engine"] == "vllm" and "bfloat16" in info["dtype"]
    finally:
        serve.shutdown()
        ray.shutdown()
