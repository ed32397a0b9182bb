"""The DeepSpeed config of a training run: a ZeRO preset plus what the pipeline config decides.

Presets ship with the package (`distill_ray/train/presets/*.json`): `zero0`, `zero1`, `zero2`,
`zero3`, `zero3-offload`. `train.deepspeed.preset` names one, or is a path to a DeepSpeed JSON of
your own; without a preset, `zero<train.deepspeed.zero_stage>` is used. Batch sizes, the optimizer
(AdamW, PyTorch's implementation: DeepSpeed's fused CPU Adam needs a minute of compilation),
the learning-rate warm-up, gradient clipping and precision (fp32 on CPU, bf16 on GPU) are set here
from `train:`, overriding the preset's.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from distill_ray.config.schema import DeepSpeed, Train
from distill_ray.config.train import preset_stages
from distill_ray.train.data import TrainDataError


def load_preset(ds: DeepSpeed) -> dict[str, Any]:
    """The preset's JSON. Raises TrainDataError for an unknown name or an unreadable file."""
    name = ds.preset or f"zero{ds.zero_stage}"
    shipped = preset_stages()
    if name in shipped:
        return json.loads(resources.files("distill_ray.train").joinpath("presets", f"{name}.json").read_text())
    path = Path(name).expanduser()
    if not path.is_file():
        raise TrainDataError(f"train.deepspeed.preset: '{name}' is neither a shipped preset ({', '.join(shipped)}) "
                             "nor an existing DeepSpeed JSON file")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainDataError(f"train.deepspeed.preset: {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(preset.get("zero_optimization", {}), dict):
        raise TrainDataError(f"train.deepspeed.preset: {path}: 'zero_optimization' must be an object")
    return preset


def deepspeed_config(train: Train, *, micro_batch: int, world_size: int, total_steps: int,
                     accumulate: int = 1) -> dict[str, Any]:
    config = copy.deepcopy(load_preset(train.deepspeed))
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("stage", train.deepspeed.zero_stage)
    if train.deepspeed.offload_optimizer and zero["stage"] > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": micro_batch * accumulate * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": train.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bool(train.use_gpu)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    if train.lr_schedule == "warmup_decay":
        # DeepSpeed raises warmup_num_steps to at least 2, and its default log warm-up (like its linear one)
        # gives warmup_min_lr to the first two optimizer steps: with a minimum of 0 they change nothing
        # (a quarter of an 8-step run). A linear warm-up from lr / (warm-up + 1) makes every step count.
        warmup = max(2, total_steps // 10)
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": train.learning_rate / (warmup + 1), "warmup_max_lr": train.learning_rate,
            "warmup_num_steps": warmup, "warmup_type": "linear", "total_num_steps": max(warmup + 1, total_steps)}}
    else:
        config.pop("scheduler", None)  # no scheduler: the optimizer's learning_rate on every step
    if not train.use_gpu:
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict):
                zero[key]["pin_memory"] = False  # no pinned memory without CUDA
    return config
