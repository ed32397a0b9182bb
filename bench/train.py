"""Training throughput: `distill-ray train` (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2) against a bare
single-process PyTorch loop on the same model, data and global batch, in the same run.

    .venv/bin/python bench/train.py               # 24 steps of the example's tiny student
    .venv/bin/python bench/train.py --steps 48 --keep-every 2

Data: the bundled example's prompt set answered by a scripted teacher on 127.0.0.1 (the right order
number), filtered — the same `filtered/` both loops read. Model: SmolLM2-135M-Instruct with every
k-th decoder layer kept (the example's students). Both count non-padding tokens per second of
training steps (forward, backward, optimizer), leaving out model loading and evaluation. The bare
loop gets every core (torch threads = cores); each Ray Train worker gets one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill_ray.config import load_config  # noqa: E402
from distill_ray.filters.step import run_filter  # noqa: E402
from distill_ray.prompts.step import run_prompts  # noqa: E402
from distill_ray.storage import Workdir  # noqa: E402
from distill_ray.teacher.step import run_generate  # noqa: E402
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig  # noqa: E402

EXAMPLE = ROOT / "jobs" / "configs" / "support_orders.yaml"


def prepare(workdir: str, prompts: int) -> list[str]:
    """The example's filtered set, answered by the scripted teacher; returns the overrides that point at it."""
    with FakeTeacher(FakeTeacherConfig()) as teacher:
        overrides = [f"workdir={workdir}", f"prompts.size={prompts}", f"teachers.0.base_url={teacher.base_url}",
                     "teachers.0.launch=null", "teachers.0.max_concurrency=64"]
        config = load_config(str(EXAMPLE), overrides)
        quiet = lambda _: None  # noqa: E731
        run_prompts(config, echo=quiet)
        run_generate(config, echo=quiet)
        run_filter(config, echo=quiet)
    return [o for o in overrides if not o.startswith("teachers.0.base_url")] + ["teachers.0.base_url=http://127.0.0.1:9/v1"]


def ours(overrides: list[str], steps: int, keep_every: int, setup: dict) -> dict:
    from distill_ray.train.step import run_train

    config = load_config(str(EXAMPLE), [*overrides, f"train.max_steps={steps}", f"train.eval_every_steps={steps}",
                                        "train.eval_sample_size=8", f"train.deepspeed.zero_stage={setup['zero']}",
                                        f"train.num_workers={setup['workers']}",
                                        f"train.cpus_per_worker={setup['cpus']}", f"train.packing={setup['packing']}",
                                        "train.early_stopping_patience=0",
                                        f"students=[{{name: bench, base_model: smollm2, layer_drop: {{keep_every: {keep_every}}}}}]"])
    start = time.perf_counter()
    run_train(config, echo=lambda line: None)
    wall = time.perf_counter() - start
    history = [json.loads(x) for x in Workdir(config.workdir).read_bytes("students", "bench", "metrics.jsonl").decode().splitlines()]
    return {"tokens_per_s": history[-1]["tokens_per_s"], "wall_s": wall, "config": config}


def bare(config, steps: int, window: bool = True) -> dict:
    """One process, plain PyTorch AdamW, same init weights, same tokenised rows and global batch, the
    same loss (logits on the answer window, as ours; `window=False`: full logits, as a plain
    `model(**batch, labels=...)` loop computes them)."""
    import torch

    from distill_ray.models import load_causal_lm
    from distill_ray.train.data import bucketed, collate, load_examples, tokenize
    from distill_ray.train.kd import student_loss

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Workdir(config.workdir)
    model, tokenizer = load_causal_lm(workdir.uri_of("students", "bench", "init"))
    model.config.use_cache = False
    model.train()
    rows = [tokenize(tokenizer, e, config.train.max_seq_len) for e in load_examples(config, workdir)["train"]]
    batch_size = config.train.batch_size
    rows = bucketed(rows, batch_size // config.train.num_workers, config.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate)
    tokens, seconds, step = 0, 0.0, 0
    while step < steps:
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            batch = collate(rows[start:start + batch_size], tokenizer.pad_token_id)
            tick = time.perf_counter()
            loss = student_loss(model, batch, 0.0, window)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - tick
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step >= steps:
                break
    return {"tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--keep-every", type=int, default=3, help="layer drop of the student (3: the example's tiny)")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage of ours")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of ours")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--packing", action="store_true", help="ours with padding-free batches (train.packing)")
    parser.add_argument("--full-logits", action="store_true",
                        help="also time the bare loop with full logits (what a plain Hugging Face loop computes)")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        overrides = prepare(f"{tmp}/run", args.prompts)
        setup = {"zero": args.zero, "workers": args.workers, "cpus": args.cpus_per_worker,
                 "packing": str(args.packing).lower()}
        mine = ours(overrides, args.steps, args.keep_every, setup)
        base = bare(mine["config"], args.steps)
        full = bare(mine["config"], args.steps, window=False) if args.full_logits else None
    ratio = mine["tokens_per_s"] / base["tokens_per_s"]
    print(f"train throughput, {args.steps} steps of global batch {mine['config'].train.batch_size}, SmolLM2 keep every "
          f"{args.keep_every} layers, {os.cpu_count()} cores")
    print(f"  distill-ray train (Ray Train, {args.workers} workers x {args.cpus_per_worker:g} CPU, DeepSpeed "
          f"ZeRO-{args.zero}{', packing' if args.packing else ''}): {mine['tokens_per_s']:.1f} tokens/s "
          f"(whole step {mine['wall_s']:.0f}s with model prep, start-up and one eval)")
    print(f"  bare PyTorch loop (1 process, {os.cpu_count()} threads, AdamW, same loss): {base['tokens_per_s']:.1f} tokens/s")
    if full:
        print(f"  bare PyTorch loop with full logits (a plain HF-style loop): {full['tokens_per_s']:.1f} tokens/s; "
              f"ours / it: {mine['tokens_per_s'] / full['tokens_per_s']:.2f}")
    print(f"  ratio ours / bare: {ratio:.2f}")


if __name__ == "__main__":
    main()
