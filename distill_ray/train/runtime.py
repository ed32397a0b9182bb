"""Where the training loop runs: the seam between `loop.run` and what starts it.

`loop.run(settings, runtime)` needs five things from its surroundings: its rank and the world's size, its
share of the training rows, the checkpoint to resume from, a way to save a checkpoint, and the node it
runs on. Two runtimes give them:

- `RayTrainRuntime` (what `distill-ray train` uses): Ray Train's TorchTrainer started the process group;
  rows come from the worker's Ray Data shard; checkpoints are Ray Train checkpoints in the run's storage
  (local or S3), restored after a worker failure.
- `TorchRuntime` (`python -m distill_ray.train.standalone`, or under `torchrun`): a plain
  `torch.distributed` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), no Ray. The
  rows come from a JSONL file, split by global batch; checkpoints go to a folder (shared by the ranks:
  one node, or a shared file system). This is how the loop is checked on a machine that has torch and
  transformers but no Ray (tests/gpu/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from typing import Any, Protocol

STATE_FILE = "distill_ray_state.json"


class Runtime(Protocol):
    rank: int
    local_rank: int
    world_size: int

    def node(self) -> str:
        """An id of the node this rank runs on (the run's summary shows placement)."""

    def epoch(self, epoch: int, micro_batch: int) -> Iterator[list[dict[str, Any]]]:
        """This rank's micro-batches (lists of tokenised rows) for one pass over its share of the data;
        every rank yields the same number."""

    def restored(self) -> contextlib.AbstractContextManager[str | None]:
        """The folder of the checkpoint to resume from, or None."""

    def save(self, folder: str, metrics: dict[str, Any]) -> None:
        """Keep `folder` (this rank's part of a checkpoint, written by every rank) as the latest
        checkpoint, with the metrics of that point. Every rank calls it."""


class RayTrainRuntime:
    """Inside Ray Train's TorchTrainer: its process group, dataset shard and checkpoints."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.local_rank, self.world_size = ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()
        self._shard = ray.train.get_dataset_shard("train")

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def epoch(self, epoch: int, micro_batch: int) -> Iterator[list[dict[str, Any]]]:
        for batch in self._shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True):
            yield batch.to_pylist()

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def save(self, folder: str, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


class TorchRuntime:
    """A plain torch.distributed environment (torchrun, or one process with RANK=0 WORLD_SIZE=1).

    The rows (a JSONL file of tokenised rows) are ordered like `data.bucketed` by global batch, and
    rank r takes the r-th slice of each global batch, cut into micro-batches: the same global batches
    whatever the micro-batch size, so gradient accumulation can be compared with one big batch.
    Checkpoints: `<checkpoint_dir>/latest/` (replaced whole once every rank wrote its part) and
    `<checkpoint_dir>/metrics.jsonl`.
    """

    def __init__(self, rows_path: str, checkpoint_dir: str, *, seed: int, accumulate: int = 1) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            import deepspeed

            deepspeed.init_distributed(dist_backend=os.environ.get("DISTILL_DIST_BACKEND"), verbose=False)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        with open(rows_path, encoding="utf-8") as f:
            self._rows = [json.loads(line) for line in f if line.strip()]
        self._checkpoints, self._seed, self._accumulate = checkpoint_dir, seed, accumulate
        os.makedirs(checkpoint_dir, exist_ok=True)

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def epoch(self, epoch: int, micro_batch: int) -> Iterator[list[dict[str, Any]]]:
        from distill_ray.train.data import bucketed

        size = micro_batch * self._accumulate * self.world_size  # the global batch
        rows = bucketed(self._rows, size, self._seed)
        if epoch:
            rng = random.Random(self._seed + epoch)  # the same global batches, another order
            batches = [rows[i:i + size] for i in range(0, len(rows), size)]
            rng.shuffle(batches)
            rows = [row for batch in batches for row in batch]
        share = size // self.world_size
        for start in range(0, len(rows) - size + 1, size):
            mine = rows[start + self.rank * share: start + (self.rank + 1) * share]
            for i in range(0, share - micro_batch + 1, micro_batch):
                yield mine[i:i + micro_batch]

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        latest = os.path.join(self._checkpoints, "latest")
        yield latest if os.path.exists(os.path.join(latest, STATE_FILE)) else None

    def save(self, folder: str, metrics: dict[str, Any]) -> None:
        import torch.distributed as dist

        incoming = os.path.join(self._checkpoints, "incoming")
        if self.rank == 0:
            shutil.rmtree(incoming, ignore_errors=True)
            os.makedirs(incoming)
        dist.barrier()
        shutil.copytree(folder, incoming, dirs_exist_ok=True)  # each rank's files have their own names
        dist.barrier()
        if self.rank == 0:
            latest = os.path.join(self._checkpoints, "latest")
            shutil.rmtree(latest, ignore_errors=True)
            os.replace(incoming, latest)
            with open(os.path.join(self._checkpoints, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        dist.barrier()
