"""LoRA students (`distill_ray.train.lora`) on the tests' tiny Llama, built in-process: what trains,
what the two exports hold, and the error a bad `target_modules` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from distill_ray.config.schema import Lora
from distill_ray.train import lora
from distill_ray.train.data import TrainDataError
from tests.helpers.models import save_tiny_student

SETTINGS = Lora(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
# fp32 on CPU: a merge (W + alpha/r * B @ A) against the adapter's own path differs in rounding only.
LOGITS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("lora") / "init")


def _train(model, steps: int, seed: int = 0) -> None:
    """A few AdamW steps on random tokens (lr high enough that the adapters move the logits)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_only_the_adapters_train(init):
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(init), SETTINGS.model_dump(), "tiny")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # 4 layers x 3 targets x (A, B)
    assert len(trainable) == 24 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model, 3)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if ".lora_B." in n)


def test_merged_and_adapter_exports_answer_as_the_trained_model(init, tmp_path):
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(init), SETTINGS, "tiny")
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(init).eval(), ids := torch.randint(0, 300, (3, 20)))
    for export in ("first", "second"):  # the second reuses the host copy: it must hold the new weights
        _train(model, 4, seed=len(export))
        trained = _logits(model, ids)
        assert (trained - base_logits).abs().max() > 0.05  # the adapters changed the model
        merged_dir, adapter_dir = tmp_path / export / "best", tmp_path / export / "best" / "adapter"
        lora.export({k: v.detach().clone() for k, v in model.state_dict().items()}, str(init), SETTINGS.model_dump(),
                    str(merged_dir), str(adapter_dir))

        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # a plain Hugging Face model, no PEFT
        assert type(merged).__name__ == "LlamaForCausalLM"
        with safe_open(merged_dir / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
        assert (_logits(merged, ids) - trained).abs().max() <= LOGITS_TOLERANCE

        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init), adapter_dir).eval()
        assert (_logits(reloaded, ids) - trained).abs().max() <= LOGITS_TOLERANCE
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(init)
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
            4, 8, ["down_proj", "q_proj", "v_proj"])
        assert (adapter_dir / "adapter_model.safetensors").stat().st_size < (merged_dir / "model.safetensors").stat().st_size / 5


def test_a_bf16_state_dict_exports_what_it_holds(init, tmp_path):
    """Weights gathered from bf16 training: the export is the model with those (rounded) weights."""
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(init), SETTINGS, "tiny")
    _train(model, 3)
    bf16 = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(bf16, strict=True)  # the same rounding in the reference
    ids = torch.randint(0, 300, (2, 16))
    lora.export(bf16, str(init), SETTINGS, str(tmp_path / "best"), str(tmp_path / "best" / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "best").eval()
    assert (_logits(merged, ids) - _logits(model, ids)).abs().max() <= LOGITS_TOLERANCE


def test_a_state_dict_without_the_adapters_is_refused(init, tmp_path):
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(init), SETTINGS, "tiny")
    plain = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    with pytest.raises(ValueError, match="24 adapter weights missing"):
        lora.export(plain, str(init), SETTINGS, str(tmp_path / "m"), str(tmp_path / "a"))


def test_a_target_module_matching_no_layer_names_the_key(init):
    bad = SETTINGS.model_copy(update={"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(TrainDataError, match=r"students\.tiny\.lora\.target_modules: 'qkv_proj' matches no layer") as err:
        lora.wrap(AutoModelForCausalLM.from_pretrained(init), bad.model_dump(), "tiny")
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)  # the names that would do
    with pytest.raises(TrainDataError, match=r"students\.tiny\.lora\.target_modules: 'mlp' matches no layer"):
        lora.check(str(init), {**SETTINGS.model_dump(), "target_modules": ["mlp"]}, "tiny")  # a block, not a layer
    lora.check(str(init), Lora(), "tiny")  # the default targets (Llama's names) all match
    lora.check(str(init), {**SETTINGS.model_dump(), "target_modules": ["self_attn.q_proj"]}, "tiny")


def test_vllm_serves_the_adapter_at_the_next_rank_it_knows():
    from distill_ray.engine.vllm import lora_kwargs

    assert lora_kwargs(4) == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
    assert lora_kwargs(16)["max_lora_rank"] == 16 and lora_kwargs(300)["max_lora_rank"] == 320
    with pytest.raises(ValueError, match="rank 600 is above 512.*students\\[\\]\\.lora\\.rank"):
        lora_kwargs(600)


def test_serving_the_adapter_checks_the_student_and_its_files(init, tmp_path, monkeypatch):
    """serve.student_adapter: refused before anything deploys when the student has no adapter to serve."""
    import shutil

    from distill_ray.config import load_config
    from distill_ray.serve.step import ServeRefused, app_args

    monkeypatch.setenv("DISTILL_SERVE_TOKEN", "t")
    monkeypatch.setenv("DISTILL_ADMIN_TOKEN", "a")
    folder = tmp_path / "students" / "tiny"
    config = load_config(None, [f"workdir={tmp_path}", "serve.student_adapter=true", "serve.min_confidence=-0.5",
                                "students=[{name: tiny, base_model: unused, lora: {rank: 4}}, {name: full, base_model: unused}]"])
    with pytest.raises(ServeRefused, match=r"tiny/best/adapter/adapter_config\.json does not exist"):
        app_args(config, "tiny", str(folder / "best"))
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(init), SETTINGS, "tiny")
    lora.export(model.state_dict(), str(init), SETTINGS, str(folder / "best"), str(folder / "best" / "adapter"))
    with pytest.raises(ServeRefused, match=r"tiny/init/config\.json does not exist"):
        app_args(config, "tiny", str(folder / "best"))
    shutil.copytree(init, folder / "init")
    assert app_args(config, "tiny", str(folder / "best"))["student_name"] == "tiny"
    with pytest.raises(ServeRefused, match="student 'full' has no `lora:`"):
        app_args(config, "full", str(tmp_path / "students" / "full" / "best"))
    with pytest.raises(ServeRefused, match="is on S3"):
        app_args(config, "tiny", "s3://bucket/run/students/tiny/best")
