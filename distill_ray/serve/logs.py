"""Request logs of the serve app: one JSON line per request, written in batches off the hot path.

A request handler only appends a dict to an in-memory queue; a writer thread turns every
`batch_size` lines (or what arrived within `flush_s`) into one file
`<workdir>/serve/logs/requests-<utc time>-<writer>-<seq>.jsonl` (local or S3: an object per batch,
as S3 objects cannot be appended to). The files are what `distill-ray drift` reads and what
`prompts.source` can point at for the next distillation.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from typing import Any

from distill_ray.storage import Workdir

LOG_DIR = ("serve", "logs")


class RequestLog:
    def __init__(self, workdir: Workdir, batch_size: int = 64, flush_s: float = 1.0):
        self.workdir, self.batch_size, self.flush_s = workdir, batch_size, flush_s
        self.writer = uuid.uuid4().hex[:8]
        self.seq = 0
        self.written = 0
        self.failed_batches = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="request-log")
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        """Queue one line (never blocks, never raises into the request)."""
        self._queue.put(record)

    def _run(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            deadline = time.monotonic() + self.flush_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._write(batch)
                    return
                batch.append(item)
            self._write(batch)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        self.seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"requests-{stamp}-{self.writer}-{self.seq:06d}.jsonl"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch).encode()
        for attempt in range(3):
            try:
                self.workdir.write_bytes(data, *LOG_DIR, name)
                self.written += len(batch)
                return
            except OSError:
                time.sleep(0.2 * (attempt + 1))
        self.failed_batches += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)
            self._thread.join(timeout=timeout_s)


def read_logs(workdir: Workdir) -> list[dict[str, Any]]:
    """Every logged request, oldest file first (a cut last line is skipped)."""
    out = []
    for name in sorted(workdir.list_files(*LOG_DIR)):
        if not name.endswith(".jsonl"):
            continue
        for line in workdir.read_bytes(*LOG_DIR, name).decode("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
