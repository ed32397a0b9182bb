"""The serve app's request log (`serve/logs.py`): a bounded queue with backpressure, a writer that
flushes on a timer, and counters that account for every line. Real files in a temp workdir; a
failing storage is a real one too: a file where the log folder must go."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from distill_ray.serve.logs import RequestLog, read_logs
from distill_ray.storage import Workdir


def _wait(predicate, timeout_s: float = 10.0) -> float:
    """Seconds until predicate() held (fails the test when it never did)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"still false after {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


def _break_storage(root: Path) -> Path:
    """Every write fails: `serve/logs` is a file, so the folder the log files go to cannot exist."""
    (root / "serve").mkdir(parents=True, exist_ok=True)
    blocker = root / "serve" / "logs"
    blocker.write_text("not a folder")
    return blocker


def _line(i: int) -> dict:
    return {"request_id": f"r{i}", "time": time.time()}


def test_lines_are_on_disk_within_flush_s_without_close(tmp_path):
    log = RequestLog(Workdir(str(tmp_path)), batch_size=64, flush_s=0.3)
    try:
        start = time.monotonic()
        assert all(log.add(_line(i)) for i in range(5))
        _wait(lambda: len(read_logs(Workdir(str(tmp_path)))) == 5, timeout_s=5)
        elapsed = time.monotonic() - start
        assert elapsed < 0.3 + 0.7, f"5 lines took {elapsed:.2f} s to reach the disk with flush_s=0.3"
        assert log.stats()["written"] == 5 and log.stats()["queued"] == 0
    finally:
        log.close()


def test_a_full_batch_is_written_before_the_flush_timer(tmp_path):
    log = RequestLog(Workdir(str(tmp_path)), batch_size=4, flush_s=30)
    try:
        for i in range(4):
            log.add(_line(i))
        waited = _wait(lambda: len(read_logs(Workdir(str(tmp_path)))) == 4, timeout_s=5)
        assert waited < 2, waited
    finally:
        log.close()


def test_close_writes_the_rest_in_order_and_later_lines_are_dropped(tmp_path):
    log = RequestLog(Workdir(str(tmp_path)), batch_size=2, flush_s=30)
    for i in range(5):
        log.add(_line(i))
    log.add({"request_id": "odd", "time": time.time(), "tags": {"a"}})  # a set: written as its str
    circular: dict = {"request_id": "circular"}
    circular["self"] = circular
    log.add(circular)  # JSON cannot hold it: that line alone is lost, and counted
    log.close()
    lines = read_logs(Workdir(str(tmp_path)))
    assert [x["request_id"] for x in lines] == ["r0", "r1", "r2", "r3", "r4", "odd"]
    assert lines[-1]["tags"] == "{'a'}"
    assert log.add(_line(9)) is False
    assert asyncio.run(log.put(_line(10))) is False
    stats = log.stats()
    assert (stats["written"], stats["dropped"], stats["queued"], stats["failed_lines"]) == (6, 2, 0, 1)


def test_full_queue_put_waits_without_blocking_the_loop_then_drops_and_a_freed_slot_unblocks_it(tmp_path):
    """The writer can't write (storage broken): the queue stays full. `put` waits block_s, with the
    event loop running, then drops and counts; once storage works, the next flush takes the queued
    lines, and a waiting `put` gets their room."""
    blocker = _break_storage(tmp_path)
    log = RequestLog(Workdir(str(tmp_path)), batch_size=4, flush_s=1.5, max_queued=4, block_s=0.25)
    try:
        for i in range(4):
            assert log.add(_line(i))
        # the full queue starts a write at once; it fails twice (a retry), the lines go back in the queue
        _wait(lambda: log.stats()["write_failures"] == 2 and log.stats()["queued"] == 4, timeout_s=5)
        assert log.add(_line(4)) is False  # the non-blocking form drops at once

        async def put_while_ticking(record: dict, block_s: float) -> tuple[bool, float, int]:
            log.block_s = block_s
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            start = time.monotonic()
            queued = await log.put(record)
            task.cancel()
            return queued, time.monotonic() - start, ticks

        queued, waited, ticks = asyncio.run(put_while_ticking(_line(5), 0.25))
        assert queued is False and 0.25 <= waited < 1.0, (queued, waited)
        assert ticks >= 10, f"the event loop ran only {ticks} ticks while put waited {waited:.2f} s"
        assert log.stats()["dropped"] == 2 and log.stats()["queued"] == 4

        blocker.unlink()  # storage works again: the next flush (at most flush_s away) frees the queue
        queued, waited, ticks = asyncio.run(put_while_ticking(_line(6), 5.0))
        assert queued is True and 0.05 < waited < 2.0, (queued, waited)
        assert ticks >= 3
        _wait(lambda: log.stats()["written"] == 5, timeout_s=5)
        stats = log.stats()
        assert (stats["dropped"], stats["failed_lines"], stats["write_failures"], stats["queued"]) == (2, 0, 2, 0)
        assert [x["request_id"] for x in read_logs(Workdir(str(tmp_path)))] == ["r0", "r1", "r2", "r3", "r6"]
    finally:
        log.close()


def test_failed_writes_are_retried_at_the_next_flush(tmp_path):
    blocker = _break_storage(tmp_path)
    log = RequestLog(Workdir(str(tmp_path)), batch_size=64, flush_s=0.2)
    try:
        for i in range(3):
            log.add(_line(i))
        _wait(lambda: log.stats()["write_failures"] >= 2, timeout_s=5)
        assert log.stats()["written"] == 0 and log.stats()["queued"] == 3
        blocker.unlink()
        _wait(lambda: log.stats()["written"] == 3, timeout_s=5)
        assert log.stats()["failed_lines"] == 0
        assert [x["request_id"] for x in read_logs(Workdir(str(tmp_path)))] == ["r0", "r1", "r2"]
    finally:
        log.close()


def test_a_broken_storage_loses_lines_only_in_the_counts(tmp_path):
    """Storage down the whole time: nothing is written, and every line offered is counted as
    written, dropped, lost to failed writes or still queued."""
    _break_storage(tmp_path)
    log = RequestLog(Workdir(str(tmp_path)), batch_size=4, flush_s=0.05, max_queued=8, block_s=0.01)

    async def offer(n: int) -> int:
        queued = 0
        for i in range(n):
            queued += await log.put(_line(i))
            if i % 10 == 0:
                await asyncio.sleep(0.02)
        return queued

    offered = 200
    queued = asyncio.run(offer(offered))
    mid = log.stats()
    assert mid["write_failures"] >= 2 and mid["written"] == 0
    assert mid["queued"] <= 8 + 8  # the queue plus the batch being tried
    assert queued + mid["dropped"] == offered
    log.close(timeout_s=10)
    end = log.stats()
    assert end["written"] == 0 and end["queued"] == 0
    assert end["failed_lines"] > 0
    assert end["written"] + end["dropped"] + end["failed_lines"] == offered, end
