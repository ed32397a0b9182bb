"""The per-worker training loop: DeepSpeed (ZeRO 0-3) inside Ray Train's TorchTrainer.

Each worker streams its Ray Data shard of the tokenised training set; DeepSpeed shards optimizer
state (ZeRO-1), gradients (2) and parameters (3) over the workers through the process group Ray
Train set up (gloo on CPU, NCCL on GPU). Every `eval_every_steps` steps:

1. the weights are consolidated onto rank 0 (ZeRO-3 gathers them) into a plain Hugging Face copy;
2. rank 0 scores that copy on the holdout: loss on the teacher's answers, and the task metric on a
   sample by greedy generation; the verdict is broadcast so every rank takes the same decision;
3. every rank saves its DeepSpeed state into a Ray Train checkpoint (for resume after a failure);
   rank 0 writes `last/` (and `best/` when the holdout metric improved) as Hugging Face folders,
   and `metrics.jsonl`;
4. early stopping after `early_stopping_patience` evals without improvement.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from distill_ray.train.data import IGNORE, answer_window, collate
from distill_ray.train.kd import student_loss, supports_logits_to_keep

STATE_FILE = "distill_ray_state.json"


def train_loop(cfg: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from distill_ray.models import load_causal_lm
    from distill_ray.storage import Workdir

    _quiet()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg["seed"])
    device = torch.device("cuda", ctx.get_local_rank()) if cfg["use_gpu"] else torch.device("cpu")
    model, tokenizer = load_causal_lm(cfg["init_uri"])
    if cfg["use_gpu"]:
        torch.cuda.set_device(device)
    model.config.use_cache = False
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad], config=cfg["deepspeed"])
    # Where each worker runs (rank order), for the step's summary: placement is visible.
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    cfg = {**cfg, "worker_nodes": nodes}
    # The copy rank 0 evaluates and exports (plain fp32 Hugging Face model, no DeepSpeed hooks).
    export_model = load_causal_lm(cfg["init_uri"])[0].to(device) if rank == 0 else None

    workdir = Workdir(cfg["workdir"])
    out = tuple(cfg["out_parts"])
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [], "tokens": 0,
             "train_seconds": 0.0, "stopped_early": False}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag="ds", load_module_strict=True)
            with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
        if rank == 0:
            _say(f"train[{cfg['name']}]: resumed at step {state['step']} from the last checkpoint")
            _write_history(workdir, out, state)  # as of that checkpoint (a crash may have cut a later eval)

    window = supports_logits_to_keep(model)
    total = cfg["total_steps"]
    shard = ray.train.get_dataset_shard("train")
    pad_id = tokenizer.pad_token_id
    step_tokens = torch.zeros(1, dtype=torch.long)
    losses: list[float] = []
    while state["step"] < total and not state["stopped_early"]:
        skip = state["batch_in_epoch"]  # batches of this epoch consumed before a restart
        tick = time.perf_counter()
        for i, batch in enumerate(shard.iter_batches(batch_size=cfg["micro_batch"], batch_format="pyarrow",
                                                     drop_last=True)):
            if i < skip:
                continue
            tensors = {k: v.to(device) for k, v in collate(batch.to_pylist(), pad_id).items()}
            # Logits on the answer window only; KD next to CE when the batch has teacher top-k.
            loss = student_loss(engine, tensors, cfg["kd_weight"], window)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            step_tokens += int(tensors["attention_mask"].sum())
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            if state["step"] % cfg["eval_every_steps"] == 0 or state["step"] == total:
                state["train_seconds"] += time.perf_counter() - tick
                _evaluate_and_checkpoint(cfg, engine, export_model, tokenizer, workdir, out, state, losses, step_tokens,
                                         rank, Checkpoint)
                losses, step_tokens = [], torch.zeros(1, dtype=torch.long)
                tick = time.perf_counter()
            if state["step"] >= total or state["stopped_early"]:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        state["train_seconds"] += time.perf_counter() - tick
    if rank == 0:
        _say(f"train[{cfg['name']}]: finished at step {state['step']}"
             + (" (early stop)" if state["stopped_early"] else ""))


def _say(line: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver). Not print():
    Ray Train patches print to also log each line, which shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet() -> None:
    """Our progress lines only: Ray Train's per-report INFO lines and DeepSpeed's chatter off."""
    import logging

    for name in ("ray.train", "ray.data", "DeepSpeed", "deepspeed", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def _evaluate_and_checkpoint(cfg, engine, export_model, tokenizer, workdir, out, state, losses, step_tokens,
                             rank, Checkpoint) -> None:
    tokens = step_tokens.clone()
    dist.all_reduce(tokens)  # every rank's tokens, for the throughput
    state["tokens"] += int(tokens)
    weights = _consolidated_state_dict(engine, cfg["zero_stage"])
    verdict: list[Any] = [None]
    if rank == 0:
        export_model.load_state_dict(weights, strict=False)
        holdout_loss = _holdout_loss(export_model, tokenizer, cfg["holdout_tokens"], cfg["micro_batch"] * 2)
        metric = _holdout_metric(export_model, tokenizer, cfg["eval_prompts"], cfg["metric"], cfg["max_new_tokens"])
        train_loss = sum(losses) / len(losses) if losses else None
        record = {"step": state["step"], "epoch": state["epoch"], "train_loss": _round(train_loss),
                  "holdout_loss": _round(holdout_loss), "metric": _round(metric),
                  "tokens_per_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix_time": round(time.time(), 3)}
        if torch.cuda.is_available() and cfg["use_gpu"]:
            record["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        score = (metric if metric is not None else 0.0, -holdout_loss)
        improved = state["best"] is None or score > tuple(state["best"])
        verdict = [{"record": record, "improved": improved, "score": list(score)}]
    dist.broadcast_object_list(verdict, src=0)
    result = verdict[0]
    record = result["record"]
    state["history"].append(record)
    if result["improved"]:
        state["best"], state["best_step"], state["bad_evals"] = result["score"], state["step"], 0
    else:
        state["bad_evals"] += 1
    patience = cfg["early_stopping_patience"]
    if patience and state["bad_evals"] >= patience:
        state["stopped_early"] = True

    if rank == 0:
        _export(export_model, tokenizer, workdir, (*out, "last"), state, record)
        if result["improved"]:
            _export(export_model, tokenizer, workdir, (*out, "best"), state, record)
        _write_history(workdir, out, state)
        _say(f"train[{cfg['name']}]: step {record['step']}/{cfg['total_steps']} train loss {record['train_loss']} "
             f"holdout loss {record['holdout_loss']} {cfg['metric_name']} {record['metric']} "
             f"{record['tokens_per_s']} tokens/s" + (" (best so far)" if result["improved"] else ""))

    with tempfile.TemporaryDirectory(prefix="distill-ray-ckpt-") as folder:
        engine.save_checkpoint(folder, tag="ds")
        if rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f)
        import ray.train

        metrics = {**{k: v for k, v in record.items() if v is not None and k not in ("time", "unix_time")},
                   "best_step": state["best_step"], "stopped_early": state["stopped_early"],
                   "worker_nodes": cfg["worker_nodes"]}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _write_history(workdir, out: tuple[str, ...], state: dict[str, Any]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in state["history"])
    workdir.write_bytes(lines.encode(), *out, "metrics.jsonl")


def _consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (every rank must call this: ZeRO-3 gathers the partitions)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 - DeepSpeed's own consolidation
    if dist.get_rank() == 0:
        return {k: v.detach().to("cpu", torch.float32) for k, v in engine.module.state_dict().items()}
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


@torch.no_grad()
def _holdout_loss(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> float | None:
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    window = supports_logits_to_keep(model)
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[start:start + batch_size], tokenizer.pad_token_id).items()}
        labels = batch["labels"]
        keep = answer_window(labels) if window else labels.size(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], **({"logits_to_keep": keep} if window else {})).logits
        logits, labels = logits[:, -keep:-1], labels[:, -keep + 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def _holdout_metric(model, tokenizer, prompts: list[dict[str, Any]], metric_name: dict[str, Any],
                    max_new_tokens: int) -> float | None:
    from distill_ray.engine.batcher import BatchGenerator, GenerationRequest
    from distill_ray.metrics import metric

    if not prompts:
        return None
    score = metric(metric_name["name"], metric_name.get("pattern"))
    generator = BatchGenerator(model, tokenizer, max_batch=16)
    requests = [GenerationRequest(prompt_ids=p["prompt_ids"], max_tokens=max_new_tokens) for p in prompts]
    answers = [r.text for i in range(0, len(requests), 16) for r in generator.generate(requests[i:i + 16])]
    return sum(score(a, p["target"]) for a, p in zip(answers, prompts, strict=True)) / len(prompts)


def _export(model, tokenizer, workdir, parts: tuple[str, ...], state: dict[str, Any], record: dict[str, Any]) -> None:
    """A Hugging Face folder (from_pretrained-loadable) under the workdir, replaced whole."""
    from distill_ray.train.students import upload_folder

    with tempfile.TemporaryDirectory(prefix="distill-ray-export-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "distill_ray_checkpoint.json"), "w", encoding="utf-8") as f:
            json.dump({"step": state["step"], **record}, f)
        workdir.remove(*parts)
        upload_folder(tmp, workdir, *parts)
