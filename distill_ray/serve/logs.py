"""Request logs of the serve app: one JSON line per request, written in batches off the hot path.

A request handler only appends a dict to a bounded in-memory queue; a writer thread turns every
`batch_size` lines, and at least every `flush_s` whatever is queued, into one file
`<workdir>/serve/logs/requests-<utc time>-<writer>-<seq>.jsonl` (local or S3: an object per batch,
as S3 objects cannot be appended to). The files are what `distill-ray drift` reads and what
`prompts.source` can point at for the next distillation.

What can be lost, and how it shows in `stats()`:
- a replica killed outright (SIGKILL, OOM, a lost node) loses the lines not yet written: at most
  about one `flush_s` of requests plus the batch being written;
- a full queue (storage slower than the traffic) holds a request up to `block_s` (backpressure),
  then drops its line: `dropped`;
- a failed write is retried at once, then put back at the head of the queue for the next flush as
  far as the queue has room; what does not fit, or fails at close, is lost: `failed_lines`
  (`write_failures` counts the failed attempts).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from typing import Any

from distill_ray.storage import Workdir

LOG_DIR = ("serve", "logs")
# One quick retry inside a flush (a blip of the storage); a longer outage waits for the next flush.
WRITE_ATTEMPTS = 2
RETRY_PAUSE_S = 0.05


class RequestLog:
    """A bounded queue of request-log lines and the thread that writes them.

    `put` (async, from the router's event loop) and `add` (sync) never raise into a request: a line
    that finds no room is dropped and counted. Counters are plain ints read by `stats()`.

    Args:
        workdir: where `serve/logs/` lives (local path or s3://).
        batch_size: most lines per file; a full batch is written without waiting for `flush_s`.
        flush_s: the longest a line waits in the queue before its write starts.
        max_queued: most lines held unwritten (queued, not counting the batch being written).
        block_s: longest wait of `put` for room in a full queue before the line is dropped.
    """

    def __init__(self, workdir: Workdir, batch_size: int = 64, flush_s: float = 0.5, max_queued: int = 4096,
                 block_s: float = 2.0):
        if batch_size < 1 or max_queued < 1 or flush_s <= 0 or block_s < 0:
            raise ValueError(f"RequestLog: batch_size ({batch_size}) and max_queued ({max_queued}) must be >= 1, "
                             f"flush_s ({flush_s}) > 0 and block_s ({block_s}) >= 0")
        self.workdir, self.batch_size, self.flush_s = workdir, batch_size, flush_s
        self.max_queued, self.block_s = max_queued, block_s
        self.writer = uuid.uuid4().hex[:8]
        self.seq = 0
        self.written = 0          # lines on storage
        self.dropped = 0          # lines refused for want of room (or after close)
        self.write_failures = 0   # failed write attempts
        self.failed_lines = 0     # lines whose write failed and that could not be kept for another try
        self._lines: deque[dict[str, Any]] = deque()
        self._writing = 0         # lines taken off the queue, not yet written or given up
        # Start a write as soon as this many lines wait (a full queue must not wait for the flush timer).
        self._trigger = min(batch_size, max_queued)
        self._cond = threading.Condition(threading.Lock())
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="request-log")
        self._thread.start()

    # ------------------------------------------------------------------------------ request side
    def _offer(self, record: dict[str, Any]) -> bool:
        """Queue the line if there is room (the caller holds the lock)."""
        if self._closing or len(self._lines) >= self.max_queued:
            return False
        self._lines.append(record)
        if len(self._lines) == self._trigger:
            self._cond.notify()
        return True

    def add(self, record: dict[str, Any]) -> bool:
        """Queue one line without waiting; a full queue drops it (counted). Returns whether it was queued."""
        with self._cond:
            if self._offer(record):
                return True
            self.dropped += 1
        return False

    async def put(self, record: dict[str, Any]) -> bool:
        """Queue one line, waiting up to `block_s` for room in a full queue (the event loop keeps
        running meanwhile); then drops it (counted). Returns whether it was queued."""
        with self._cond:  # the common case: room at once
            if self._offer(record):
                return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_s
        while True:
            with self._cond:
                if self._offer(record):
                    return True
                left = deadline - loop.time()
                if self._closing or left <= 0:
                    self.dropped += 1
                    return False
                room = loop.create_future()
                self._waiters.append((loop, room))
            try:
                # The writer sets the future when it takes lines off the queue; another put may take the
                # room first, hence the loop.
                await asyncio.wait_for(room, left)
            except TimeoutError:
                pass
            finally:
                with self._cond:
                    if (loop, room) in self._waiters:
                        self._waiters.remove((loop, room))

    # ------------------------------------------------------------------------------- writer side
    def _wake_waiters(self) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for loop, room in waiters:
            try:
                loop.call_soon_threadsafe(_set_once, room)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                continue

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_s
        hold = False  # after a failed write: nothing more until the next flush
        while True:
            with self._cond:
                while not self._closing:
                    left = next_flush - time.monotonic()
                    if left <= 0 or (len(self._lines) >= self._trigger and not hold):
                        break
                    self._cond.wait(left)
                closing = self._closing
                flush = closing or time.monotonic() >= next_flush
                # A flush takes everything queued; between flushes only a full trigger's worth.
                take = len(self._lines) if flush else self._trigger
                batch = [self._lines.popleft() for _ in range(min(take, len(self._lines)))]
                self._writing = len(batch)
                if flush:
                    next_flush = time.monotonic() + self.flush_s
            if batch:
                self._wake_waiters()
            failed: list[dict[str, Any]] = []
            for start in range(0, len(batch), self.batch_size):
                chunk = batch[start:start + self.batch_size]
                lost = self._write(chunk)
                failed += lost
                with self._cond:
                    self._writing -= len(chunk) - len(lost)
            hold = bool(failed)
            if failed:
                self._keep(failed, closing)
            if closing:  # everything queued was taken (nothing is queued after close): done
                return

    def _keep(self, failed: list[dict[str, Any]], closing: bool) -> None:
        """Put failed lines back at the head of the queue for the next flush, as far as there is room."""
        with self._cond:
            self._writing -= len(failed)
            room = 0 if closing else max(0, self.max_queued - len(self._lines))
            kept = failed[:room]
            self._lines.extendleft(reversed(kept))
            self.failed_lines += len(failed) - len(kept)

    def _write(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write one file; returns the lines that failed to be written (none on success)."""
        self.seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"requests-{stamp}-{self.writer}-{self.seq:06d}.jsonl"
        records, lines = [], []
        for record in batch:
            try:  # default=str: a value JSON cannot hold must not make the whole batch unwritable
                lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                records.append(record)
            except ValueError:  # a circular record: that line alone is lost, and counted
                self.failed_lines += 1
        if not lines:
            return []
        data = "".join(lines).encode()
        for attempt in range(WRITE_ATTEMPTS):
            try:
                self.workdir.write_bytes(data, *LOG_DIR, name)
            except OSError:
                self.write_failures += 1
                if attempt + 1 < WRITE_ATTEMPTS:
                    time.sleep(RETRY_PAUSE_S)
                continue
            self.written += len(lines)
            return []
        return records

    # ---------------------------------------------------------------------------------- control
    def stats(self) -> dict[str, Any]:
        """Counters for /v1/distill/stats: lines written, dropped (no room), failed writes and lines
        lost to them, lines held unwritten now (`queued`, the batch being written included)."""
        with self._cond:
            queued = len(self._lines) + self._writing
        return {"written": self.written, "dropped": self.dropped, "write_failures": self.write_failures,
                "failed_lines": self.failed_lines, "queued": queued, "max_queued": self.max_queued,
                "flush_s": self.flush_s, "batch_size": self.batch_size, "block_s": self.block_s}

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer (later lines are dropped and counted)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._wake_waiters()
        self._thread.join(timeout=timeout_s)


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def log_files(workdir: Workdir) -> list[str]:
    """The request log files under `serve/logs/`, oldest first (their names start with the time)."""
    return sorted(name for name in workdir.list_files(*LOG_DIR) if name.endswith(".jsonl"))


def read_log_files(workdir: Workdir, names: list[str]) -> list[dict[str, Any]]:
    """The lines of these log files (a line cut short by a crash is skipped)."""
    out = []
    for name in names:
        for line in workdir.read_bytes(*LOG_DIR, name).decode("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_logs(workdir: Workdir) -> list[dict[str, Any]]:
    """Every logged request, oldest file first (a cut last line is skipped)."""
    return read_log_files(workdir, log_files(workdir))
