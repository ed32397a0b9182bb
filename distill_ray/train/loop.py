"""The per-worker training loop: DeepSpeed (ZeRO 0-3) on each rank of a process group.

`run(settings, runtime)` is the loop (`settings.LoopSettings`); `train_loop(config)` is its Ray Train entry
(TorchTrainer, the settings as JSON), and
`distill_ray.train.standalone` runs it in a plain torch.distributed environment without Ray
(`runtime.py`). Each rank streams its share of the tokenised training set; DeepSpeed shards the
optimizer state (ZeRO-1), gradients (2) and parameters (3) over the ranks (gloo on CPU, NCCL on GPU).

Big students:
- ZeRO-3 builds the model under `deepspeed.zero.Init` (transformers' `from_pretrained` does so while a
  `HfDeepSpeedConfig` is alive): each rank holds only its partition of the weights from the start,
  never a whole copy.
- `train.gradient_checkpointing` recomputes each decoder layer's activations in the backward pass.
- `train.gradient_accumulation_steps` k: each optimizer step runs k micro-batches per rank; the loss is
  divided by the answer tokens of the whole global batch (all-reduced before the forward), so the
  gradient is that of one k-times batch.
- `train.packing`: padding-free micro-batches (`data.collate_packed`).
- `students[].lora`: LoRA adapters (PEFT) on a frozen base; only the adapters are trained and in the
  optimizer.

Every `eval_every_steps` steps:
1. the weights are gathered to rank 0's CPU (ZeRO-3: DeepSpeed's consolidation, one layer at a time) and
   written as a Hugging Face folder (LoRA: merged, and the adapter beside it);
2. rank 0 scores the model on the holdout: loss on the teacher's answers, and the task metric on a
   sample by greedy generation. Under ZeRO 0-2 it evaluates its own training module (every rank holds
   all weights); under ZeRO-3 it loads the folder it just wrote for the eval and frees it after: no
   second model stays on the GPU. The verdict is broadcast so every rank takes the same decision;
3. every rank saves its DeepSpeed state into a checkpoint (for resume after a failure); rank 0 uploads
   `last/` (and `best/` when the holdout metric improved) and `metrics.jsonl`;
4. early stopping after `early_stopping_patience` evals without improvement.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from distill_ray.train.data import collate, collate_packed
from distill_ray.train.holdout import score_loss, score_metric
from distill_ray.train.kd import loss_counts, student_loss, supports_logits_to_keep
from distill_ray.train.runtime import STATE_FILE, Runtime
from distill_ray.train.settings import LoopSettings


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry: the loop on this worker (`config`: `LoopSettings.to_json()`), with Ray Train's runtime."""
    from distill_ray.train.runtime import RayTrainRuntime

    settings = LoopSettings.from_json(config)
    if not settings.use_gpu:
        # The worker's share of the node: Ray sets OMP_NUM_THREADS to it, but a worker process that imported
        # torch before keeps torch's default (every core), and 2 workers x 2 threads on 2 cores halve each other.
        torch.set_num_threads(settings.cpu_threads)
    run(settings, RayTrainRuntime())


def run(s: LoopSettings, rt: Runtime) -> dict[str, Any]:
    """Train one student on this rank; returns the loop's final state (the same on every rank)."""
    import deepspeed

    from distill_ray.storage import Workdir

    _quiet()
    torch.manual_seed(s.seed)
    rank = rt.rank
    device = torch.device("cuda", rt.local_rank) if s.use_gpu else torch.device("cpu")
    if s.use_gpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(verbose=False)  # DeepSpeed's view of the process group (before zero.Init)
    model, tokenizer, sizes, _hf_ds_config = _load_student(s)  # the config must outlive the run (ZeRO-3)
    if s.lora:
        from distill_ray.train import lora

        model = lora.wrap(model, s.lora)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad], config=s.deepspeed)
    nodes: list[Any] = [None] * rt.world_size
    dist.all_gather_object(nodes, rt.node())  # where each rank runs, for the step's summary
    placement = {"worker_nodes": nodes, **sizes}

    workdir = Workdir(s.workdir)
    out = s.out_parts
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [],
             "tokens": 0, "train_seconds": 0.0, "stopped_early": False}
    with rt.restored() as folder:
        if folder is not None:
            engine.load_checkpoint(folder, tag="ds", load_module_strict=True)
            with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            if rank == 0:
                _say(f"train[{s.name}]: resumed at step {state['step']} from the last checkpoint")
                _write_history(workdir, out, state)  # as of that checkpoint (a crash may have cut a later eval)

    window = supports_logits_to_keep(model)
    accumulate, total = s.gradient_accumulation_steps, s.total_steps
    pad_id = tokenizer.pad_token_id
    step_tokens = torch.zeros(1, dtype=torch.long)
    loss_sum, loss_steps = 0.0, 0
    while state["step"] < total and not state["stopped_early"]:
        skip = state["batch_in_epoch"]  # micro-batches of this epoch consumed before a restart
        tick = time.perf_counter()
        for i, micro in enumerate(_steps(rt.epoch(state["epoch"], s.micro_batch), accumulate)):
            if i * accumulate < skip:
                continue
            batches = [collate_packed(rows) if s.packing else collate(rows, pad_id) for rows in micro]
            # Divide by the global batch's answer tokens (and KD positions), then undo DeepSpeed's
            # averaging over micro-batches and ranks: the gradient of one big batch.
            norm = torch.tensor([sum(loss_counts(b)[j] for b in batches) for j in (0, 1)], dtype=torch.float64)
            dist.all_reduce(norm)
            scale = rt.world_size * accumulate
            for batch in batches:
                tensors = {k: v.to(device) for k, v in batch.items()}
                loss = student_loss(engine, tensors, s.kd_weight, window, (float(norm[0]), float(norm[1])))
                engine.backward(loss * scale)
                engine.step()
                loss_sum += float(loss.detach())
                step_tokens += _tokens(batch)
            loss_steps += 1
            state["step"] += 1
            state["batch_in_epoch"] = (i + 1) * accumulate
            if state["step"] % s.eval_every_steps == 0 or state["step"] == total:
                state["train_seconds"] += time.perf_counter() - tick
                train_loss = torch.tensor([loss_sum, loss_steps], dtype=torch.float64)
                dist.all_reduce(train_loss)  # each rank's share of each step's loss, summed: the global loss
                _evaluate_and_checkpoint(s, engine, tokenizer, workdir, state, float(train_loss[0]) / max(loss_steps, 1),
                                         step_tokens, rt, device, placement)
                loss_sum, loss_steps, step_tokens = 0.0, 0, torch.zeros(1, dtype=torch.long)
                tick = time.perf_counter()
            if state["step"] >= total or state["stopped_early"]:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        state["train_seconds"] += time.perf_counter() - tick
    if rank == 0:
        _say(f"train[{s.name}]: finished at step {state['step']}" + (" (early stop)" if state["stopped_early"] else ""))
    return state


def _steps(micro_batches, accumulate: int):
    """Micro-batches grouped by optimizer step (a trailing incomplete group is dropped)."""
    group: list[list[dict[str, Any]]] = []
    for rows in micro_batches:
        group.append(rows)
        if len(group) == accumulate:
            yield group
            group = []


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _load_student(s: LoopSettings) -> tuple[Any, Any, dict[str, int], Any]:
    """The student and its tokenizer. Under ZeRO-3 the model is built inside `deepspeed.zero.Init`
    (transformers does it while an HfDeepSpeedConfig lives): each rank allocates only its partition.
    Also returns the elements of the whole model and those this rank holds, and the HfDeepSpeedConfig
    (ZeRO-3; None otherwise), which the caller keeps alive."""
    from distill_ray.models import load_causal_lm

    zero3, hf_ds_config = s.zero_stage == 3, None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(s.deepspeed)
    model, tokenizer = load_causal_lm(s.init_uri, dtype=_dtype(s))
    model.config.use_cache = False
    if zero3:
        whole = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    else:
        whole = held = sum(p.numel() for p in model.parameters())
    return model, tokenizer, {"model_elements": whole, "model_elements_on_rank": held}, hf_ds_config


def _dtype(s: LoopSettings) -> torch.dtype:
    return torch.bfloat16 if s.deepspeed.get("bf16", {}).get("enabled") else torch.float32


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
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" at every export
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def _evaluate_and_checkpoint(s: LoopSettings, engine, tokenizer, workdir, state, train_loss, step_tokens,
                             rt: Runtime, device, placement: dict[str, Any]) -> None:
    rank = rt.rank
    tokens = step_tokens.clone()
    dist.all_reduce(tokens)  # every rank's tokens, for the throughput
    state["tokens"] += int(tokens)
    weights = _gather_to_cpu(engine, s.zero_stage)  # every rank takes part; rank 0 gets them
    verdict: list[Any] = [None]
    export = tempfile.mkdtemp(prefix="distill-ray-export-") if rank == 0 else None
    try:
        if rank == 0:
            with _zero3_off():  # rank 0 alone builds plain models here (a LoRA host copy): no zero.Init
                _write_export(engine, weights, tokenizer, s, export)
            del weights
            with _eval_model(engine, s, export, device) as model:
                holdout_loss = score_loss(model, tokenizer, s.holdout_tokens, s.micro_batch * 2)
                metric = score_metric(model, tokenizer, s)
            record = {"step": state["step"], "epoch": state["epoch"], "train_loss": _round(train_loss),
                      "holdout_loss": _round(holdout_loss), "metric": _round(metric),
                      "tokens_per_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix_time": round(time.time(), 3),
                      **_memory(s.use_gpu, placement)}
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
        patience = s.early_stopping_patience
        if patience and state["bad_evals"] >= patience:
            state["stopped_early"] = True

        if rank == 0:
            with open(os.path.join(export, "distill_ray_checkpoint.json"), "w", encoding="utf-8") as f:
                json.dump({"step": state["step"], **record}, f)
            _upload(export, workdir, (*s.out_parts, "last"))
            if result["improved"]:
                _upload(export, workdir, (*s.out_parts, "best"))
            _write_history(workdir, s.out_parts, state)
            _say(f"train[{s.name}]: step {record['step']}/{s.total_steps} train loss {record['train_loss']} "
                 f"holdout loss {record['holdout_loss']} {s.metric_name} {record['metric']} "
                 f"{record['tokens_per_s']} tokens/s" + (" (best so far)" if result["improved"] else ""))
    finally:
        if export:
            shutil.rmtree(export, ignore_errors=True)

    with tempfile.TemporaryDirectory(prefix="distill-ray-ckpt-") as folder:
        engine.save_checkpoint(folder, tag="ds")
        if rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f)
        metrics = {**{k: v for k, v in record.items() if v is not None and k not in ("time", "unix_time")},
                   "best_step": state["best_step"], "stopped_early": state["stopped_early"],
                   "worker_nodes": placement["worker_nodes"]}
        rt.save(folder, metrics)


def _memory(use_gpu: bool, placement: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's peaks so far: GPU memory allocated (CUDA) and host memory (resident set), and how much of
    the model this rank holds (ZeRO-3: its partition)."""
    import resource

    out = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),  # KiB -> GB
           **{k: placement[k] for k in ("model_elements", "model_elements_on_rank")}}
    if use_gpu and torch.cuda.is_available():
        out["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _write_history(workdir, out: tuple[str, ...], state: dict[str, Any]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in state["history"])
    workdir.write_bytes(lines.encode(), *out, "metrics.jsonl")


def _gather_to_cpu(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full weights (state_dict names) on rank 0's CPU; None on other ranks. Every rank must call
    it: under ZeRO-3 DeepSpeed gathers the partitions one module at a time and copies each to rank 0's
    CPU, so no rank ever holds the whole model on its GPU at once."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 - DeepSpeed's own consolidation
    if dist.get_rank() == 0:
        return {k: v.detach().to("cpu") for k, v in engine.module.state_dict().items()}
    return None


def _write_export(engine, weights: dict[str, torch.Tensor], tokenizer, s: LoopSettings, folder: str) -> None:
    """The export folder (from_pretrained-loadable) from the gathered CPU weights; a LoRA student's
    weights merged, with its adapter under `adapter/`."""
    if s.lora:
        from distill_ray.train import lora

        lora.export(weights, s.init_uri, s.lora, folder, os.path.join(folder, "adapter"))
    else:
        engine.module.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _eval_model(engine, s: LoopSettings, export: str, device):
    """The model rank 0 evaluates. ZeRO 0-2: its own training module (already whole here), in eval
    mode for the time of the eval. ZeRO-3: the export just written, loaded for the eval and freed
    after (a transient copy, not one kept beside training)."""
    if s.zero_stage < 3:
        module = engine.module
        module.eval()
        try:
            yield module
        finally:
            module.train()
        return
    from transformers import AutoModelForCausalLM

    with _zero3_off():
        model = AutoModelForCausalLM.from_pretrained(export, dtype=_dtype(s)).to(device).eval()
    try:
        yield model
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _zero3_off():
    """Load a plain model while the training run's HfDeepSpeedConfig (ZeRO-3) is alive: transformers
    would otherwise partition it with zero.Init."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref  # noqa: SLF001 - transformers keeps it as a module global
    hf_ds._hf_deepspeed_config_weak_ref = None  # noqa: SLF001
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved  # noqa: SLF001


def _upload(local: str, workdir, parts: tuple[str, ...]) -> None:
    """A Hugging Face folder under the workdir, replaced whole."""
    from distill_ray.train.students import upload_folder

    workdir.remove(*parts)
    upload_folder(local, workdir, *parts)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
