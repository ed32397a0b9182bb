"""Steps 4-5: fine-tune each student on the filtered teacher answers with Ray Train and DeepSpeed.

Everything that can be wrong with the inputs is checked on the driver before a worker starts
(exit 2): no training rows, a base model that does not exist, a DeepSpeed preset that does not
exist, `max_seq_len` shorter than the shortest prompt. Each student then trains in its own Ray
Train run whose checkpoints live under `students/<name>/ray/`: a crashed run restarts from its last
checkpoint (up to `train.max_failures` times), and running `distill-ray train` again after a crash
resumes it; after success it does nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig, Student
from distill_ray.errors import StepFailed
from distill_ray.manifest import StepRecord, read_manifest, up_to_date, write_manifest
from distill_ray.metrics import holdout_target
from distill_ray.models import ModelNotFoundError
from distill_ray.storage import Workdir, filesystem_for
from distill_ray.teacher.errors import MissingInput
from distill_ray.train.data import TrainDataError, bucketed, load_examples, tokenize
from distill_ray.train.deepspeed_config import deepspeed_config, load_preset
from distill_ray.train.settings import LoopSettings
from distill_ray.train.students import prepare_student

HOLDOUT_LOSS_ROWS = 256  # holdout rows scored for loss at each eval


def run_train(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every student in `students:`; returns {name: manifest}.

    Raises:
        MissingInput: no filtered set yet (exit 2).
        TrainDataError: the data or settings cannot train a student (exit 2).
    """
    workdir = Workdir(config.workdir)
    filtered = read_manifest(workdir, "filtered")
    if not filtered:
        raise MissingInput(f"no filtered set in {workdir.uri_of('filtered')}: run `distill-ray filter` first")
    examples = load_examples(config, workdir)
    from_references = sum(1 for e in examples["train"] if e["target"] == "reference")
    if from_references:
        echo(f"train: {from_references} of {len(examples['train'])} training prompts use the log's reference "
             "(train.prefer_references), the rest the teacher's kept answer")
    if not examples["train"]:
        raise TrainDataError(f"train: the filtered set in {workdir.uri_of('filtered')} keeps no training rows "
                             f"({filtered['counts'].get('dropped_by_reason')}); loosen `filters:` or fix the teacher")
    for student in config.students:  # an unknown preset fails here, before any model is loaded
        load_preset(config.train_for(student).deepspeed)
    manifests, rows = {}, []
    for student in config.students:
        own = config.model_copy(update={"train": config.train_for(student)})  # with the student's train overrides
        manifest = _train_one(own, student, workdir, examples, filtered["fingerprint"], echo)
        manifests[student.name] = manifest
        rows.append(manifest["result"])
    workdir.write_json({"students": rows}, "students", "comparison.json")
    echo(comparison_table(rows, _loop_metric(config)))
    return manifests


def _train_one(config: PipelineConfig, student: Student, workdir: Workdir, examples: dict[str, list[dict[str, Any]]],
               filtered_fingerprint: str, echo: Callable[[str], None]) -> dict[str, Any]:
    step = f"students/{student.name}"
    # max_failures is how a run copes with a crash, not what it trains: raising it after a crash resumes.
    record = StepRecord(step, {"filtered": filtered_fingerprint},
                        {"student": student.model_dump(mode="json"),
                         "train": config.train.model_dump(mode="json", exclude={"max_failures"}),
                         "task": config.task.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        echo(f"train[{student.name}]: up to date ({workdir.uri_of(step, 'best')}); nothing to do")
        return manifest
    _start_or_resume(workdir, student.name, record.fingerprint, echo)
    t0 = time.perf_counter()
    init, data, settings = _plan(config, student, workdir, examples, echo)
    echo(f"train[{student.name}]: {len(data['train'])} training rows ({data['truncated']} cut to max_seq_len "
         f"{config.train.max_seq_len}), {settings.total_steps} steps on {config.train.num_workers} workers, "
         f"ZeRO-{settings.zero_stage}, holdout {len(data['holdout'])} rows ({len(data['eval_prompts'])} generated per eval)")
    if data["kd_rows"] is not None:
        echo(f"train[{student.name}]: logit distillation on {data['kd_rows']} of {len(data['train'])} rows (teacher "
             "tokens align with the student's); plain SFT on the rest")
    result = _fit(config, student, workdir, settings, data["train"])
    history = [r for r in _read_metrics(workdir, step)]
    best = max(history, key=lambda r: ((r["metric"] if r["metric"] is not None else 0.0), -(r["holdout_loss"] or 0)))
    summary = {"student": student.name, "parameters": init["parameters"], "layers": init["layers"],
               "best_step": best["step"], "holdout_loss": best["holdout_loss"], "metric": best["metric"],
               "tokens_per_s": history[-1]["tokens_per_s"], "steps": history[-1]["step"],
               "stopped_early": bool(result.get("stopped_early")), "checkpoint": workdir.uri_of(step, "best"),
               "worker_nodes": result.get("worker_nodes")}
    record.counts = {"train_rows": len(data["train"]), "truncated": data["truncated"], "kd_rows": data["kd_rows"],
                     "holdout_rows": len(data["holdout"]), "steps": history[-1]["step"]}
    record.timings = {"total": time.perf_counter() - t0}
    record.extra = {"result": summary}
    if summary["worker_nodes"] and len(set(summary["worker_nodes"])) > 1:
        echo(f"train[{student.name}]: workers ran on {len(set(summary['worker_nodes']))} nodes: "
             + ", ".join(f"rank {i} {n[:12]}" for i, n in enumerate(summary["worker_nodes"])))
    return write_manifest(workdir, record)


def _plan(config: PipelineConfig, student: Student, workdir: Workdir, examples: dict[str, list[dict[str, Any]]],
          echo: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any], LoopSettings]:
    """The student's starting point, its tokenised data and the loop's settings; every input checked."""
    try:
        init = prepare_student(student, workdir, echo)
    except ModelNotFoundError as exc:
        raise TrainDataError(f"students.{student.name}.base_model: {exc}") from None
    if student.lora:
        from distill_ray.train import lora

        lora.check(init["uri"], student.lora, student.name)
    tokenizer = _tokenizer(init["uri"])
    data = _tokenized(config, student, tokenizer, examples)
    return init, data, _loop_config(config, student, workdir, init["uri"], data)


def write_bundles(config: PipelineConfig, folder: str, echo: Callable[[str], None] = print) -> list[str]:
    """For each student, the training loop's bundle (`<folder>/<student>/loop.json` + `train.jsonl`) to run
    without Ray: `python -m distill_ray.train.standalone <folder>/<student>` (or under torchrun)."""
    from distill_ray.train.standalone import write_bundle

    workdir = Workdir(config.workdir)
    if not read_manifest(workdir, "filtered"):
        raise MissingInput(f"no filtered set in {workdir.uri_of('filtered')}: run `distill-ray filter` first")
    examples = load_examples(config, workdir)
    out = []
    for student in config.students:
        own = config.model_copy(update={"train": config.train_for(student)})
        load_preset(own.train.deepspeed)
        _, data, settings = _plan(own, student, workdir, examples, echo)
        path = os.path.join(folder, student.name)
        write_bundle(path, settings, data["train"])
        echo(f"train[{student.name}]: bundle in {path} ({len(data['train'])} rows, {settings.total_steps} steps): "
             f"python -m distill_ray.train.standalone {path}")
        out.append(path)
    return out


def _tokenizer(uri: str):
    from transformers import AutoTokenizer

    from distill_ray.models import load_causal_lm

    if uri.startswith("s3://"):
        return load_causal_lm(uri)[1]
    tokenizer = AutoTokenizer.from_pretrained(uri, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenized(config: PipelineConfig, student: Student, tokenizer, examples) -> dict[str, Any]:
    from distill_ray.chat import prompt_ids

    limit = config.train.max_seq_len
    prompts = {split: [prompt_ids(tokenizer, e["messages"]) for e in rows] for split, rows in examples.items()}
    shortest = min(len(p) for p in prompts["train"])
    if limit <= shortest:
        raise TrainDataError(f"train.max_seq_len: {limit} tokens leave no room for an answer: the shortest prompt "
                             f"of student '{student.name}' is {shortest} tokens; raise it above "
                             f"{max(len(p) for p in prompts['train'])} (the longest) to train on every answer")
    kd_cache: dict[str, int | None] | None = {} if config.train.logit_distillation else None
    train = [tokenize(tokenizer, e, limit, kd_cache) for e in examples["train"]]
    holdout = [tokenize(tokenizer, e, limit) for e in examples["holdout"][:HOLDOUT_LOSS_ROWS]]
    sample = examples["holdout"][: config.train.eval_sample_size]
    # the holdout rows here are kept answers only: trusted
    eval_prompts = [{"prompt_ids": p, "target": holdout_target({"reference": e["reference"], "teacher": e["completion"]})}
                    for e, p in zip(sample, prompts["holdout"], strict=False)]
    keys = ("input_ids", "labels", "kd") if kd_cache is not None else ("input_ids", "labels")
    return {"train": [{k: t[k] for k in keys} for t in train], "truncated": sum(t["truncated"] for t in train),
            "holdout": holdout, "eval_prompts": eval_prompts,
            "kd_rows": sum(1 for t in train if t.get("kd")) if kd_cache is not None else None}


def _loop_config(config: PipelineConfig, student: Student, workdir: Workdir, init_uri: str,
                 data: dict[str, Any]) -> LoopSettings:
    t = config.train
    world, accumulate = t.num_workers, t.gradient_accumulation_steps
    if t.batch_size < world * accumulate:
        raise TrainDataError(f"train.batch_size: {t.batch_size} rows per step cannot be split over {world} workers x "
                             f"{accumulate} micro-batches (train.gradient_accumulation_steps); raise it to at least "
                             f"{world * accumulate}")
    micro = t.batch_size // (world * accumulate)
    per_epoch = (len(data["train"]) // world) // (micro * accumulate)
    if per_epoch == 0:
        raise TrainDataError(f"train.batch_size: {len(data['train'])} training rows are fewer than one global batch "
                             f"({micro} per micro-batch x {accumulate} micro-batches x {world} workers)")
    total = per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, per_epoch * t.epochs)
    return LoopSettings(
        name=student.name, init_uri=init_uri, workdir=workdir.uri, out_parts=("students", student.name),
        deepspeed=deepspeed_config(t, micro_batch=micro, world_size=world, total_steps=total, accumulate=accumulate),
        micro_batch=micro, global_batch=micro * accumulate * world, total_steps=total,
        eval_every_steps=min(t.eval_every_steps, total), holdout_tokens=data["holdout"],
        eval_prompts=data["eval_prompts"], metric_name=_loop_metric(config), metric_pattern=config.task.metric_pattern,
        max_new_tokens=max(teacher.max_tokens for teacher in config.teachers), seed=t.seed, use_gpu=t.use_gpu,
        cpu_threads=max(1, int(t.cpus_per_worker)), early_stopping_patience=t.early_stopping_patience,
        kd_weight=t.kd_weight, gradient_accumulation_steps=accumulate, gradient_checkpointing=t.gradient_checkpointing,
        packing=t.packing, lora=student.lora.model_dump() if student.lora else None,
    )


def _fit(config: PipelineConfig, student: Student, workdir: Workdir, settings: LoopSettings,
         train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distill_ray.ray_env import init_ray
    from distill_ray.train.loop import train_loop

    init_ray()
    t = config.train
    fs, path = filesystem_for(workdir.uri_of("students", student.name, "ray"))
    if not workdir.uri.startswith("s3://"):
        os.makedirs(path, exist_ok=True)
    # The split coordinator runs in its own actor; its progress bars would flood the driver's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(bucketed(train_rows, settings.micro_batch, t.seed))
    trainer = TorchTrainer(
        train_loop, train_loop_config=settings.to_json(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        datasets={"train": dataset},
        run_config=RunConfig(name="run", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 - Ray Train raises what the workers raised; reported below
        error = exc
    if error is not None:
        raise StepFailed(f"train[{student.name}]: training failed ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no message'}). Its last "
                         f"checkpoint is kept under {workdir.uri_of('students', student.name, 'ray')}: run "
                         "`distill-ray train` again to resume from it.") from error
    return dict(result.metrics or {})


def _start_or_resume(workdir: Workdir, name: str, fingerprint: str, echo: Callable[[str], None]) -> None:
    """A run interrupted under the same settings and data resumes from its checkpoint; after a change
    (data, student, `train:`), the old checkpoints, exports and metrics are cleared: a checkpoint
    trained under other settings must not pass for this run's."""
    import json

    stamp = ("students", name, "run.json")
    if workdir.exists(*stamp):
        previous = json.loads(workdir.read_bytes(*stamp)).get("fingerprint")
        if previous != fingerprint:
            echo(f"train[{name}]: the data or settings changed since the last run: starting over")
            for part in ("ray", "best", "last", "metrics.jsonl", "manifest.json"):
                workdir.remove("students", name, part)
    elif workdir.exists("students", name, "ray"):
        echo(f"train[{name}]: checkpoints of a run with unknown settings: starting over")
        for part in ("ray", "best", "last", "metrics.jsonl", "manifest.json"):
            workdir.remove("students", name, part)
    workdir.write_json({"fingerprint": fingerprint}, *stamp)


def _loop_metric(config: PipelineConfig) -> str:
    """The metric checked during training: the task's, except 'llm_judge' (a judge call per eval
    would bill the teacher every few steps), for which token_f1 against the target stands in."""
    return config.task.string_metric


def _read_metrics(workdir: Workdir, step: str) -> list[dict[str, Any]]:
    import json

    data = workdir.read_bytes(step, "metrics.jsonl").decode()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def comparison_table(rows: list[dict[str, Any]], metric: str) -> str:
    head = f"{'student':<12} {'params':>8} {'layers':>9} {'holdout loss':>12} {metric:>17} {'tokens/s':>9}  checkpoint"
    lines = ["students compared (best checkpoint of each, by holdout metric):", head]
    for r in rows:
        m = "-" if r["metric"] is None else f"{r['metric']:.3f}"
        loss = "-" if r["holdout_loss"] is None else f"{r['holdout_loss']:.4f}"
        lines.append(f"{r['student']:<12} {r['parameters'] / 1e6:>7.1f}M {r['layers']:>9} {loss:>12} {m:>17} "
                     f"{r['tokens_per_s']:>9.1f}  {r['checkpoint']}")
    return "\n".join(lines)
