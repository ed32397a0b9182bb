"""The pipeline's steps, in order: the one list that `run`, `submit` and the job entry points share.

Each step names the library function that runs it (imported only when the step runs, so that
`validate` and `submit` stay light), its Ray job entry point (`jobs/<name>.py`) and the GPUs its
driver asks for when it runs as a Ray job. A new step is one line here plus its `jobs/<name>.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from distill_ray.config import PipelineConfig


def no_gpu(config: PipelineConfig) -> float:
    """The driver of most steps only schedules Ray tasks: it needs no GPU."""
    return 0


def one_gpu_if_use_gpu(config: PipelineConfig) -> float:
    """For train and eval: the driver lands on a GPU node (CUDA image, student on the device) when
    `train.use_gpu` is on. `distill-ray submit --entrypoint-gpus 0` frees it where the driver only
    coordinates Ray Train workers."""
    return 1 if config.train.use_gpu else 0


def never(config: PipelineConfig) -> bool:
    return False


def always(config: PipelineConfig) -> bool:
    return True


def when_served(config: PipelineConfig) -> bool:
    """redistill asks the teacher only about served prompts: not before the serve app logged any."""
    from distill_ray.serve.logs import LOG_DIR
    from distill_ray.storage import Workdir

    return Workdir(config.workdir).exists(*LOG_DIR)


def when_judging(config: PipelineConfig) -> bool:
    """eval calls a teacher only for the LLM-judge metric."""
    return config.task.metric == "llm_judge"


@dataclass(frozen=True)
class Step:
    """One pipeline step."""

    name: str
    runner: str  # "module:function" taking the PipelineConfig
    entrypoint_gpus: Callable[[PipelineConfig], float] = no_gpu
    calls_teacher: Callable[[PipelineConfig], bool] = never  # if so, `launch` teachers serve while it runs

    @property
    def script(self) -> str:
        """The Ray job entry point, relative to the repository root."""
        return f"jobs/{self.name}.py"

    def load(self) -> Callable[[PipelineConfig], object]:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("prompts", "distill_ray.prompts.step:run_prompts"),
    Step("generate", "distill_ray.teacher.step:run_generate", calls_teacher=always),
    Step("filter", "distill_ray.filters.step:run_filter"),
    # The driver of train only coordinates Ray Train's workers (they hold the GPUs).
    Step("train", "distill_ray.train.step:run_train"),
    # eval's driver runs no model itself today (a Ray Data actor and a Ray task do), but on a GPU
    # cluster its job lands next to the students' GPUs.
    Step("eval", "distill_ray.eval.step:run_eval", entrypoint_gpus=one_gpu_if_use_gpu, calls_teacher=when_judging),
    # The student behind the safety net on Ray Serve, the held-out traffic replayed through it in
    # shadow mode, then in canary; the teacher answers (shadow) and catches fallbacks.
    Step("replay", "distill_ray.serve.replay:run_replay", calls_teacher=always),
    Step("drift", "distill_ray.drift:run_drift"),
    # The flywheel: a round of prompts, teacher (reusing the answers serve paid for), filter, train and
    # eval on the served traffic, the current student fine-tuned further; a no-op without new traffic.
    Step("redistill", "distill_ray.flywheel.step:run_redistill", calls_teacher=when_served),
)}


def parse_steps(text: str | None) -> list[str]:
    """`a,b` → the step names, in the order given; None → every step.

    Raises:
        ValueError: naming the unknown steps and the available ones.
    """
    if not text:
        return list(STEPS)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown or not wanted:
        raise ValueError(f"unknown step(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(STEPS)}")
    return wanted
