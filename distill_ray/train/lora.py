"""LoRA students (PEFT): a frozen base with low-rank adapters on some linear layers, and their exports.

`students[].lora` turns a student into a LoRA student. Training wraps the loaded model once
(`wrap`: only the adapters train, so the optimizer state and the gradients are a few MB even for a
large base), and every export writes it twice (`export`):

- `best/` (and `last/`): the base with the adapters merged in, a plain Hugging Face folder that any
  engine loads as it loads a fully fine-tuned student (eval and serving need nothing else);
- `best/adapter/`: the adapter alone (`adapter_config.json` + `adapter_model.safetensors`, PEFT's
  format), which vLLM serves on top of the untouched base `init/` with `serve.student_adapter: true`
  (one base in memory can then carry several students).

`check` validates `target_modules` against the model's layer names before any worker starts, so a
typo is an exit-2 error naming the key instead of an adapter silently missing from some layers
(PEFT ignores a target name that matches nothing as long as another one matches).

    model = lora.wrap(load_causal_lm(init)[0], student.lora, student.name)   # on every rank
    ...train...
    lora.export(gathered_state_dict, init, student.lora, merged_dir, adapter_dir)   # on rank 0
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from distill_ray.config.schema import Lora
from distill_ray.train.data import TrainDataError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

ADAPTER = "default"  # PEFT's name for a model's one adapter

# Rank 0's host copy of the PEFT model that exports are written from: (key, model). One at a time.
_cpu_copy: tuple[tuple[str, str], PeftModel] | None = None


def settings(lora: Lora | dict[str, Any]) -> Lora:
    """The `Lora` section, from the pydantic model or its `model_dump()` (the loop's JSON config)."""
    return lora if isinstance(lora, Lora) else Lora.model_validate(lora)


def lora_config(lora: Lora | dict[str, Any], base: str | None = None) -> LoraConfig:
    """PEFT's LoraConfig for a causal LM from `students[].lora`; `base` is recorded as the adapter's
    `base_model_name_or_path`."""
    from peft import LoraConfig

    s = settings(lora)
    alpha = int(s.alpha) if float(s.alpha).is_integer() else s.alpha  # 32, not 32.0, in adapter_config.json
    return LoraConfig(task_type="CAUSAL_LM", r=s.rank, lora_alpha=alpha, lora_dropout=s.dropout,
                      target_modules=list(s.target_modules), base_model_name_or_path=base)


def check(model: str | PreTrainedModel, lora: Lora | dict[str, Any], student_name: str | None = None) -> None:
    """Every name in `target_modules` must match at least one layer that LoRA can adapt.

    Cheap on a folder: the model is built from its config.json on the meta device (no weights read).

    Args:
        model: a loaded model, or a model spec (a local folder, an s3:// prefix, `smollm2`, a cached
            Hugging Face id).
        lora: the student's `lora:` section (pydantic or dict).
        student_name: for the error message (`students.<name>.lora.target_modules`).

    Raises:
        TrainDataError: a target name matches no layer (the message names the key and lists the layer
            names that would do).
    """
    if isinstance(model, str):
        model = _skeleton(model)
    adaptable = _adaptable_layers(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
    for target in settings(lora).target_modules:
        if not any(name == target or name.endswith("." + target) for name in adaptable):
            key = f"students.{student_name or '<name>'}.lora.target_modules"
            raise TrainDataError(f"{key}: {target!r} matches no layer of {type(model).__name__} that LoRA can adapt; "
                                 f"its layers are named {', '.join(leaves)}")


def wrap(model: PreTrainedModel, lora: Lora | dict[str, Any], student_name: str | None = None) -> PeftModel:
    """The model with LoRA adapters on `target_modules` (PEFT's `get_peft_model`): the base's weights
    are frozen, only the adapters require grad.

    With gradient checkpointing, enable it through transformers (`gradient_checkpointing_enable`,
    before or after this): it makes the embeddings' output require grad, which frozen embeddings
    need for the checkpointed layers' adapters to get gradients.

    Raises:
        TrainDataError: a target name matches no layer (see `check`).
    """
    from peft import get_peft_model

    check(model, lora, student_name)
    return get_peft_model(model, lora_config(lora, getattr(model, "name_or_path", None) or None))


def export(state_dict: dict[str, torch.Tensor], base_folder: str, lora: Lora | dict[str, Any], merged_dir: str,
           adapter_dir: str) -> None:
    """Write a trained LoRA student twice: merged into its base, and as the adapter alone.

    Runs on the host: the first call loads the base from `base_folder` (fp32, CPU) and keeps it with
    its adapters for the next calls; each call loads `state_dict` into that copy. Nothing is placed
    on an accelerator.

    Args:
        state_dict: the trained PEFT model's weights as `peft_model.state_dict()` names them
            (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`, ...), on CPU,
            any float dtype. The adapters' weights are required; the base's may be left out (they are
            frozen, so the copy's own, from `base_folder`, are the same).
        base_folder: the student's starting weights (`students/<name>/init`: a folder or an s3://
            prefix); also the adapter's `base_model_name_or_path`.
        lora: the student's `lora:` section (pydantic or dict), as the model was wrapped with.
        merged_dir: where the merged model goes (a Hugging Face folder: `from_pretrained` loads it
            without PEFT). The caller adds the tokenizer.
        adapter_dir: where the adapter goes (`adapter_config.json`, `adapter_model.safetensors`:
            `PeftModel.from_pretrained(base, adapter_dir)` and vLLM's LoRA load it).

    Raises:
        ValueError: `state_dict` lacks adapter weights or has keys the wrapped model does not have
            (a state dict of another model or another `lora:`).
    """
    model = _host_copy(base_folder, lora)
    _load(model, state_dict)
    os.makedirs(adapter_dir, exist_ok=True)
    model.peft_config[ADAPTER].base_model_name_or_path = base_folder
    model.save_pretrained(adapter_dir)
    os.makedirs(merged_dir, exist_ok=True)
    model.get_base_model().save_pretrained(merged_dir, state_dict=merged_state_dict(model))


def merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict, plain names (`...q_proj.weight`), with every adapter merged in
    (W + alpha/r * B @ A, PEFT's own delta). The model itself is left as it is: no merge and unmerge,
    whose rounding would creep into the copy kept between exports."""
    import torch

    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if ADAPTER in getattr(module, "lora_A", {}) or ADAPTER in getattr(module, "lora_embedding_A", {}):
                deltas[f"{name}.weight"] = module.get_delta_weight(ADAPTER)
        merged = {}
        for key, value in model.get_base_model().state_dict().items():
            if ".lora_" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            merged[plain] = value + deltas[plain].to(value.dtype) if plain in deltas else value
    return merged


def _host_copy(base_folder: str, lora: Lora | dict[str, Any]) -> PeftModel:
    """The wrapped model exports are written from, on the host; loaded once per base and `lora:`."""
    global _cpu_copy
    key = (base_folder, json.dumps(settings(lora).model_dump(), sort_keys=True))
    if _cpu_copy is None or _cpu_copy[0] != key:
        _cpu_copy = None  # the previous student's copy goes before the next one loads
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from distill_ray.models import model_folder

        base = AutoModelForCausalLM.from_pretrained(model_folder(base_folder), dtype=torch.float32,
                                                    local_files_only=True)
        _cpu_copy = (key, get_peft_model(base, lora_config(lora, base_folder)).eval())
    return _cpu_copy[1]


def _load(model: PeftModel, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    unknown = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if ".lora_" in k and k not in state_dict)
    if unknown or missing:
        raise ValueError("lora.export: the state dict does not fit the wrapped student: "
                         + (f"{len(unknown)} unknown keys (e.g. {unknown[0]})" if unknown else "")
                         + ("; " if unknown and missing else "")
                         + (f"{len(missing)} adapter weights missing (e.g. {missing[0]})" if missing else ""))
    model.load_state_dict(state_dict, strict=False)  # copies into the fp32 host weights, casting


def _adaptable_layers(model: Any) -> list[str]:
    """Names of the modules PEFT's LoRA can wrap (linear, embedding and convolution layers)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def _skeleton(spec: str) -> PreTrainedModel:
    """The model of a spec, built from its config on the meta device: module names, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill_ray.models import model_folder
    from distill_ray.storage import filesystem_for, is_s3

    if is_s3(spec):  # only config.json, not the weights
        fs, root = filesystem_for(spec)
        with tempfile.TemporaryDirectory(prefix="distill-ray-config-") as tmp:
            with fs.open_input_stream(f"{root.rstrip('/')}/config.json") as src, \
                    open(os.path.join(tmp, "config.json"), "wb") as dst:
                dst.write(src.read())
            config = AutoConfig.from_pretrained(tmp, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(model_folder(spec), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
