"""A holder's side of a teacher's ledger (`ledger.TeacherLedger`): permits leased in batches, slots reused,
usage settled in batches, and a heartbeat that keeps the holder's leases alive."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

SLOT_WAIT_S = 0.05  # how long the ledger holds a request for slots before answering without


class LeaseClient:
    """A holder's side of the ledger: request permits leased in small batches, concurrency slots kept
    and reused while this holder has requests waiting, usage settled in batches, and a heartbeat.

    Permits and slots are separate: a request needs one of each. A finished request's slot goes to
    the next request waiting here, with no call to the ledger; permits come in batches. So at full
    concurrency one ledger call serves many requests, and a slot is never idle while a flush timer
    runs (bench/teacher.py and bench/limiter.py measure it). Idle slots go back after `flush_s`, at
    once when other holders wait for slots, and all unused permits and slots at `close`.
    """

    def __init__(self, ledger, batch: int, holder: str, step: str, flush_s: float = 0.05, ttl_s: float = 30.0):
        self.ledger, self.batch, self.flush_s = ledger, max(1, batch), flush_s
        self.holder, self.step, self.ttl_s = holder, step, ttl_s
        self.permits = 0  # request permits held, unused
        self.slots = 0  # concurrency slots held (busy + idle)
        self.busy = 0  # slots in use by a request
        self.contended = False
        self.fair = 1 << 30
        self.waiting = 0
        self.lock: asyncio.Lock | None = None
        self.reservations: deque[tuple[float, int]] = deque()  # (dollars, tokens) reserved per unused permit
        self.pending: dict[str, Any] = self._empty()
        self.last_flush = time.monotonic()
        self.flush_timer: asyncio.TimerHandle | None = None
        self.beat: asyncio.Task | None = None
        self.slot_freed: asyncio.Event | None = None

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"count": 0, "token_correction": 0, "est_cost": 0.0, "cost": 0.0, "answered": 0,
                "answered_keys": [], "failed_keys": []}

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            self.ledger.heartbeat.remote(self.holder)

    async def acquire(self, est_tokens: int, est_cost: float) -> bool:
        """One permit and one slot for a request; False when the budget refuses it."""
        if self.lock is None:
            self.lock, self.slot_freed = asyncio.Lock(), asyncio.Event()
        if self.beat is None or self.beat.done():
            self.beat = asyncio.get_running_loop().create_task(self._heartbeat())
        self.waiting += 1
        try:
            async with self.lock:
                while self.permits == 0 or self.slots == self.busy:
                    want = min(self.batch, self.waiting)
                    need_permits = want if self.permits == 0 else 0
                    need_slots = want if self.slots == self.busy else 0
                    if need_slots and not need_permits and self.busy:
                        # Our own requests hold slots: the next to end frees one for us, sooner than
                        # the ledger could.
                        self.slot_freed.clear()
                        try:
                            await asyncio.wait_for(self.slot_freed.wait(), timeout=SLOT_WAIT_S)
                            continue
                        except TimeoutError:
                            pass
                    lease = await self.ledger.acquire.remote(self.holder, self.step, need_permits, need_slots,
                                                             est_tokens, est_cost, 0.0 if self.busy else SLOT_WAIT_S)
                    self.permits += lease.granted
                    self.reservations.extend([(est_cost, est_tokens)] * lease.granted)
                    self.slots += lease.slots
                    self.contended, self.fair = lease.contended, lease.fair
                    if need_permits and lease.granted == 0:
                        return False  # the budget
                    if self.slots == self.busy and not self.busy and need_slots and not lease.slots:
                        await asyncio.sleep(SLOT_WAIT_S / 5)  # none free anywhere: ask again shortly
                self.permits -= 1
                self.busy += 1
                # The permit was reserved at the estimate of the request that leased it; this request
                # settles at its own: book the difference, so exactly what was reserved comes back.
                reserved_cost, reserved_tokens = self.reservations.popleft()
                self.pending["est_cost"] += reserved_cost - est_cost
                self.pending["token_correction"] += est_tokens - reserved_tokens
                return True
        finally:
            self.waiting -= 1

    async def claim(self, keys: list[str]) -> dict[str, list[str]]:
        return await self.ledger.claim.remote(self.holder, keys)

    def settle(self, est_tokens: int, used_tokens: int, est_cost: float, cost: float, answered: bool) -> None:
        """One request ended: its slot is free for the next request here, its usage is booked."""
        self.busy -= 1
        if self.slot_freed is not None:
            self.slot_freed.set()
        p = self.pending
        p["count"] += 1
        p["token_correction"] += used_tokens - est_tokens
        p["est_cost"] += est_cost
        p["cost"] += cost
        p["answered"] += int(answered)
        self._schedule()

    def done(self, key: str, answered: bool) -> None:
        """An answer key is finished: answered (and durable in the cache) or failed for this run."""
        (self.pending["answered_keys"] if answered else self.pending["failed_keys"]).append(key)
        self._schedule()

    def _schedule(self) -> None:
        p = self.pending
        if (p["count"] + len(p["answered_keys"]) >= 2 * self.batch or time.monotonic() - self.last_flush >= self.flush_s
                or (self._spare() and (self.contended or not self.waiting))):
            self.flush()
        elif self.flush_timer is None:
            # Usage is booked, and idle slots given back, within flush_s.
            self.flush_timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def _spare(self) -> int:
        """Idle slots to give back: those nobody here waits for, and, while other holders wait for
        slots, those beyond this holder's fair share."""
        idle = self.slots - self.busy
        spare = 0 if self.waiting else idle
        if self.contended:
            spare = max(spare, min(idle, self.slots - self.fair))
        return spare

    def throttle(self, retry_after_s: float) -> None:
        self.ledger.throttle.remote(retry_after_s)

    def flush(self) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        idle = self._spare()
        p = self.pending
        if p["count"] or p["answered_keys"] or p["failed_keys"] or idle:
            self.pending = self._empty()
            self.slots -= idle
            self.ledger.settle.remote(self.holder, self.step, p["count"], p["token_correction"], p["est_cost"],
                                      p["cost"], p["answered"], p["answered_keys"], p["failed_keys"], idle)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """End of a busy spell: settle what is pending, return unused permits, slots and claims, stop
        the heartbeat."""
        self.flush()
        if self.permits or self.slots - self.busy:
            idle = self.slots - self.busy
            self.ledger.settle.remote(self.holder, self.step, 0, 0, sum(c for c, _ in self.reservations), 0.0,
                                      slots=idle, unused=self.permits,
                                      unused_tokens=sum(t for _, t in self.reservations))
            self.permits, self.slots = 0, self.slots - idle
            self.reservations.clear()
        self.ledger.release.remote(self.holder)
        if self.beat is not None:
            self.beat.cancel()
            self.beat = None
