"""What the training loop of one student is told: `LoopSettings`, planned by the driver (`step.py`).

The same settings reach the loop three ways, always as the JSON object `to_json` gives: Ray Train's
`train_loop_config`, a bundle's `loop.json` (`distill-ray train CONFIG --bundle DIR`, run by
`standalone.py`), and the bundles tests and benchmarks write by hand. `from_json` reads it back and
refuses a missing or unknown key, or a value of the wrong type, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from distill_ray.errors import BadInput

Row = dict[str, Any]


class LoopSettingsError(BadInput, ValueError):
    """A loop.json (or a train_loop_config) that is not a student's loop settings (exit 2)."""


@dataclass(frozen=True)
class LoopSettings:
    """One student's training run, as every rank runs it."""

    name: str  # the student, for progress lines
    init_uri: str  # the weights it starts from: a Hugging Face folder, local or s3://
    workdir: str  # where exports and metrics go, under `out_parts`
    out_parts: tuple[str, ...]  # ("students", name)
    deepspeed: dict[str, Any]  # the DeepSpeed config (`deepspeed_config.deepspeed_config`)
    micro_batch: int  # rows per rank and forward pass
    global_batch: int  # rows per optimizer step, over every rank and micro-batch
    total_steps: int
    eval_every_steps: int
    holdout_tokens: list[Row]  # tokenised holdout rows (input_ids, labels) scored for loss
    eval_prompts: list[Row]  # {prompt_ids, target}: generated and scored with the metric
    metric_name: str  # the metric checked during training (`metrics.metric`)
    max_new_tokens: int  # per generated holdout answer
    metric_pattern: str | None = None  # the task's metric_pattern, for the metrics that take one
    seed: int = 0
    use_gpu: bool = False
    cpu_threads: int = 1  # torch threads of a CPU worker
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0: never stop early
    kd_weight: float = 0.0  # weight of logit distillation where rows carry the teacher's top-k
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    packing: bool = False
    lora: dict[str, Any] | None = None  # `students[].lora`; None: every weight is trained

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs (the one its config says: never a second copy to disagree)."""
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready object (`from_json` reads it back)."""
        return {**dataclasses.asdict(self), "out_parts": list(self.out_parts)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "loop settings") -> LoopSettings:
        """The settings of a `to_json` object.

        Raises:
            LoopSettingsError: a key missing, unknown, or of the wrong type (named, with `where`).
        """
        if not isinstance(data, dict):
            raise LoopSettingsError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise LoopSettingsError(f"{where}: unknown keys {unknown}; the loop reads {sorted(fields)}")
        missing = sorted(name for name, f in fields.items() if name not in data and _required(f))
        if missing:
            raise LoopSettingsError(f"{where}: missing keys {missing}")
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise LoopSettingsError(f"{where}: {key}: {value!r:.80} is not {_describe(hints[key])}")
        return cls(**{**data, **({"out_parts": tuple(data["out_parts"])} if "out_parts" in data else {})})


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field of type `hint` (container items are not checked)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, list | tuple)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", bool: "true or false",
            dict: "an object", list: "a list", tuple: "a list"}.get(typing.get_origin(hint) or hint, str(hint))
