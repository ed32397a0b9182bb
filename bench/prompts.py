"""Throughput and memory of `distill-ray prompts` on a generated production-style log.

    .venv/bin/python bench/prompts.py                 # 200,000 rows (the figure in docs/benchmarks.md)
    .venv/bin/python bench/prompts.py --rows 20000    # a quick look

Generates the log with the bundled example generator (categories, skew, exact/normalised/near
duplicates, bad lines), runs the real CLI (`distill-ray prompts`, its own local Ray) in a child
process, and samples the RSS of that process and every process it starts (the Ray workers, raylet,
GCS) every 0.2 s. Prints rows/second end to end and per stage, and the peak memory of the tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_ray.examples.support_orders import write_log  # noqa: E402


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=20_000, help="prompts.size (prompts kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as tmp:
        log = Path(tmp) / "log.jsonl"
        t = time.perf_counter()
        write_log(str(log), args.rows, args.seed)
        print(f"generated {args.rows:,} rows ({log.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
        cmd = [sys.executable, "-m", "distill_ray", "prompts", str(ROOT / "jobs/configs/support_orders.yaml"),
               "-o", f"prompts.source={log}", "-o", f"workdir={tmp}/run", "-o", f"prompts.size={args.size}"]
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # always a fresh local Ray, started by the CLI
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ps = psutil.Process(proc.pid)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(ps))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = proc.communicate()[0]
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        if proc.returncode != 0:
            print(output)
            raise SystemExit(f"distill-ray prompts failed with exit {proc.returncode}")
        manifest = json.loads((Path(tmp) / "run/prompts/manifest.json").read_text())

    timings = manifest["timings"]
    counts = manifest["counts"]
    print(f"distill-ray prompts: {args.rows:,} rows in {seconds:.1f}s wall (incl. Ray start) "
          f"-> {args.rows / seconds:,.0f} rows/s; step itself {timings['total']:.1f}s -> "
          f"{args.rows / timings['total']:,.0f} rows/s")
    print("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total"))
    print(f"  peak RSS of the whole process tree (driver + Ray): {peak[0] / 2**30:.2f} GiB")
    print(f"  bad rows {counts['bad_rows']:,}, duplicates removed {counts['duplicates_removed']}, "
          f"unique {counts['unique_prompts']:,}, kept {counts['train'] + counts['holdout']:,}")


if __name__ == "__main__":
    main()
