"""The ceiling of one global rate limiter: rate-limit leases per second that one `TeacherLedger` actor
grants, with 1, 8 and 64 concurrent clients (a client = one generate worker's `LeaseClient`), and
how leasing in batches raises it; then the same with the limiter sharded.

    .venv/bin/python bench/limiter.py                       # 4 s per cell
    .venv/bin/python bench/limiter.py --seconds 8 --shards 4

The limiter is set far above what is asked (no waiting on the buckets): what is measured is the
actor's own throughput — the ceiling that one teacher's requests/s can reach through it, whatever
the API allows. Clients run in up to 4 processes (Ray actors) on this machine, as workers would on
several nodes; every lease is settled, as a request's end settles it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--batches", default="1,8,32", help="leases asked per limiter call (generate's lease batch)")
    parser.add_argument("--shards", type=int, default=4, help="also measure the limiter split into this many shards")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)

    import ray

    from distill_ray.teacher.ledger import LeaseClient, TeacherLedger

    @ray.remote(num_cpus=0)
    class Clients:
        """`n` LeaseClients in one process, each driven by enough coroutines to fill its batches."""

        async def run(self, limiters: list, n: int, batch: int, seconds: float, first: int) -> int:
            count = 0
            stop = time.monotonic() + seconds

            async def drive(leases: LeaseClient) -> None:
                nonlocal count
                while time.monotonic() < stop:
                    if await leases.acquire(12, 0.0):
                        leases.settle(12, 12, 0.0, 0.0, True)
                        count += 1

            clients = [LeaseClient(limiters[(first + i) % len(limiters)], batch, holder=f"bench:{first + i}", step="bench")
                       for i in range(n)]
            await asyncio.gather(*(drive(c) for c in clients for _ in range(max(2, batch))))
            for c in clients:
                c.close()
            return count

    ray.init(num_cpus=2, logging_level="ERROR", include_dashboard=False)
    tmp = tempfile.mkdtemp(prefix="bench-limiter-")
    processes = [Clients.remote() for _ in range(4)]
    clients_list = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    def measure(shards: int, clients: int, batch: int) -> float:
        limiters = [TeacherLedger.remote(f"bench{i}", f"{tmp}/ledger-{shards}-{i}") for i in range(shards)]
        ray.get([lim.configure.remote(10**9 / shards, 0, 10**7, None) for lim in limiters])
        used = processes[:min(clients, len(processes))]
        per = [clients // len(used) + (1 if i < clients % len(used) else 0) for i in range(len(used))]
        firsts = [sum(per[:i]) for i in range(len(used))]
        t = time.perf_counter()
        counts = ray.get([p.run.remote(limiters, n, batch, args.seconds, first)
                          for p, n, first in zip(used, per, firsts, strict=True)])
        wall = time.perf_counter() - t
        for lim in limiters:
            ray.kill(lim)
        return sum(counts) / wall

    print(f"leases/s granted by the limiter, {args.seconds:g} s per cell, {os.cpu_count()} cores "
          "(clients = LeaseClients, as generate workers)")
    results: dict[tuple[int, int, int], float] = {}
    for shards in (1, args.shards) if args.shards > 1 else (1,):
        print(f"\n{shards} limiter actor{'s' if shards > 1 else ''}:")
        print("  batch \\ clients " + "".join(f"{c:>10}" for c in clients_list))
        for batch in batches:
            row = []
            for clients in clients_list:
                results[(shards, batch, clients)] = rate = measure(shards, clients, batch)
                row.append(rate)
            print(f"  {batch:>15} " + "".join(f"{r:>10.0f}" for r in row))
    one = {k: v for k, v in results.items() if k[0] == 1}
    unbatched = max(v for (s, b, c), v in one.items() if b == 1)
    best = max(one.values())
    print(f"\none limiter, one lease per call: ceiling {unbatched:.0f} leases/s; with batches: {best:.0f} leases/s "
          f"({best / unbatched:.1f}x)")
    if args.shards > 1:
        sharded = max(v for (s, b, c), v in results.items() if s == args.shards)
        print(f"{args.shards} shards: {sharded:.0f} leases/s ({sharded / best:.2f}x one limiter's best)")
    ray.shutdown()


if __name__ == "__main__":
    main()
