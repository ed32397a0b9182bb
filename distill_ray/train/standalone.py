"""The training loop without Ray: one process, or several under torchrun.

    python -m distill_ray.train.standalone BUNDLE                            # one process
    torchrun --nproc-per-node 8 -m distill_ray.train.standalone BUNDLE      # 8 ranks on this node

BUNDLE is a folder with `loop.json` (the loop's settings, `settings.LoopSettings` as JSON, as `distill-ray
train CONFIG --bundle BUNDLE` writes them for each student: model, DeepSpeed config, steps, holdout, eval
sample) and `train.jsonl` (the tokenised training rows). The loop is the one Ray Train runs (`loop.run`); only its surroundings differ
(`runtime.TorchRuntime`): the process group comes from torch.distributed's environment, checkpoints go
to `BUNDLE/checkpoints/` (resumed from when present), exports and metrics to the workdir in loop.json.
Nothing here imports Ray: this is how the loop runs on a machine that has torch, transformers and
DeepSpeed but no Ray (tests/gpu/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from distill_ray.train.settings import LoopSettings, LoopSettingsError


def _single_process_env() -> None:
    """RANK/WORLD_SIZE/MASTER_* for one process started without torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def run_bundle(bundle: str, checkpoint_dir: str | None = None) -> dict[str, Any]:
    """Train the bundle's student on this rank; returns the loop's final state."""
    from distill_ray.train.loop import run
    from distill_ray.train.runtime import TorchRuntime

    settings = read_settings(bundle)
    _single_process_env()
    runtime = TorchRuntime(os.path.join(bundle, "train.jsonl"), checkpoint_dir or os.path.join(bundle, "checkpoints"),
                           seed=settings.seed, accumulate=settings.gradient_accumulation_steps)
    accumulate = settings.gradient_accumulation_steps
    if runtime.world_size * settings.micro_batch * accumulate != settings.global_batch:
        sys.stderr.write(f"note: loop.json was planned for a global batch of {settings.global_batch}; with "
                         f"{runtime.world_size} ranks it is {runtime.world_size * settings.micro_batch} x {accumulate}\n")
    return run(settings, runtime)


def read_settings(bundle: str) -> LoopSettings:
    """The bundle's loop.json.

    Raises:
        LoopSettingsError: not JSON, or not a student's loop settings (the file and key named).
    """
    path = os.path.join(bundle, "loop.json")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise LoopSettingsError(f"{path}: not JSON ({exc})") from exc
    return LoopSettings.from_json(data, where=path)


def write_bundle(folder: str, settings: LoopSettings, rows: list[dict[str, Any]]) -> None:
    """`loop.json` and `train.jsonl` for `run_bundle`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "loop.json"), "w", encoding="utf-8") as f:
        json.dump(settings.to_json(), f)
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_ray.train.standalone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder with loop.json and train.jsonl")
    parser.add_argument("--checkpoint-dir", help="default: BUNDLE/checkpoints (shared by the ranks)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.bundle, "loop.json")):
        sys.stderr.write(f"error: {args.bundle}: no loop.json (write one with `distill-ray train CONFIG --bundle DIR`)\n")
        return 2
    try:
        read_settings(args.bundle)  # a bad loop.json stops here, before a process group starts
    except LoopSettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    state = run_bundle(args.bundle, args.checkpoint_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        last = state["history"][-1] if state["history"] else {}
        print(json.dumps({"steps": state["step"], "best_step": state["best_step"], **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
