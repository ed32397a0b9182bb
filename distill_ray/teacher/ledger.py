"""One ledger per teacher for the whole pipeline: its limits, its spend, and who holds what.

Every call to a teacher, from any step (generate, eval's LLM judge, serve's fallback), first takes a
lease from that teacher's ledger, a named Ray actor: one request from the requests-per-minute bucket,
its estimated tokens (prompt estimate + max_tokens) from the tokens-per-minute bucket, one of
`max_concurrency` in-flight slots, and its estimated cost from `budget_usd`. When the request ends
the lease is settled with the real usage (the token bucket and the spend are corrected) and the
slot comes back.

- **Spend is persisted** in `<workdir>/teacher/ledger/<teacher>.json`, per step, so `budget_usd`
  caps the total across steps and reruns (a rerun starts from what was spent before).
- **Leases die with their holder.** Each lease carries its holder (a worker, the driver, a serve
  replica) and an expiry that the holder renews while it is alive (`LeaseClient` heartbeats). A
  holder silent past `lease_ttl_s` is taken for dead: its slots and reserved dollars come back,
  and the answers it was asking for may be claimed again (counted as `reclaimed`).
- **An answer is never asked for twice.** Before sending, a worker claims the answer keys of its
  batch: keys already answered in this run (a batch Ray Data re-runs after a node loss) are not
  sent; keys held by a live holder are waited for; keys of a dead holder are sent again, and
  counted, since that request may have been billed.
- **429s**: the ledger pauses every holder for the Retry-After and lowers the rate (multiplicative
  decrease), then recovers it while no 429 arrives (additive increase), like TCP's congestion control.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray

from distill_ray.storage import Workdir

MIN_RATE_FACTOR = 0.1  # never slow below a tenth of the configured rate
RECOVERY_PER_S = 0.01  # regain 1% of the configured rate per second without a 429
NAMESPACE = "distill-ray"
PERSIST_EVERY_S = 1.0
SLOT_WAIT_S = 0.05  # how long the ledger holds a request for slots before answering without


def ledger_path(teacher: str) -> tuple[str, ...]:
    return ("teacher", "ledger", f"{teacher}.json")


def read_spend(workdir: Workdir, teacher: str) -> dict[str, Any]:
    """A teacher's persisted spend: {"spent_usd": total, "by_step": {step: {...}}} (zeros when none)."""
    if workdir.exists(*ledger_path(teacher)):
        return workdir.read_json(*ledger_path(teacher))
    return {"teacher": teacher, "spent_usd": 0.0, "by_step": {}}


def spend_by_step(workdir: Workdir, teachers: list[str]) -> dict[str, dict[str, float]]:
    """{teacher: {step: dollars}} from the persisted ledgers (for summaries)."""
    return {t: {step: round(v.get("spent_usd", 0.0), 6) for step, v in read_spend(workdir, t)["by_step"].items()}
            for t in teachers}


@dataclass
class Lease:
    granted: int  # request permits: how many requests may be sent
    slots: int  # concurrency slots (held until given back: a holder reuses its own)
    reason: str | None = None  # "budget" when no permit was granted
    contended: bool = False  # other holders wait for slots: keep no more than `fair`
    fair: int = 1 << 30  # max_concurrency / holders wanting slots


@dataclass
class _Holder:
    slots: int = 0
    reserved: float = 0.0
    expires: float = 0.0
    step: str = ""


class TokenBucket:
    """A continuous-refill bucket; `rate_per_s * burst_s` is its capacity."""

    def __init__(self, rate_per_s: float, burst_s: float = 1.0):
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        # Start empty: a provider counts requests per sliding minute, and a full bucket at start
        # would let the first minute see the limit plus one burst.
        self.level = 0.0
        self.stamp = time.monotonic()

    def refill(self, factor: float) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate * factor)
        self.stamp = now

    def wait_for(self, amount: float, factor: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        self.refill(factor)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / (self.rate * factor)


@ray.remote(num_cpus=0, max_concurrency=10_000, max_restarts=-1)
class TeacherLedger:
    """The cluster-wide ledger of one teacher (an async actor: waiting leases cost nothing).

    Restarted by Ray if its node dies (it lives with the driver's node, or wherever serve put it): it
    then reloads the persisted spend; reservations of that moment are lost, as are their holders.
    """

    def __init__(self, teacher: str, workdir: str):
        self.teacher, self.workdir = teacher, Workdir(workdir)
        saved = read_spend(self.workdir, teacher)
        self.by_step: dict[str, dict[str, float]] = {s: dict(v) for s, v in saved["by_step"].items()}
        self.spent = float(saved.get("spent_usd", 0.0))
        self.in_flight = 0
        self.reserved = 0.0
        self.answered = 0  # answers received (progress)
        self.ended = 0  # requests ended (answered or not)
        self.factor = 1.0
        self.paused_until = 0.0
        self.last_429 = 0.0
        self.throttled = 0
        self.recover_stamp = time.monotonic()
        self.holders: dict[str, _Holder] = {}
        self.expired_holders = 0
        self.expired_slots = 0
        self.answered_keys: set[str] = set()
        self.claims: dict[str, str] = {}  # answer key -> holder asking for it now
        self.orphaned: set[str] = set()  # keys whose holder died asking for them
        self.reclaimed = 0  # of those, answered by another holder (the dead one may have sent them: billed twice)
        self.skipped = 0  # claims refused because the key was answered already
        self.dirty = False
        self.last_persist = 0.0
        self.lock = asyncio.Lock()  # FIFO: leases are granted in the order they were asked
        self.freed = asyncio.Event()  # set whenever in-flight slots come back
        self.slot_waiting: set[str] = set()  # holders that asked for slots and got none
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.budget: float | None = None
        self.configure(1e9, 0, 4096, None)

    # Settings, per step: the step starting states its limits (a rerun may raise the budget).

    def configure(self, requests_per_minute: float, tokens_per_minute: float, max_concurrency: int,
                  budget_usd: float | None, lease_ttl_s: float = 30.0, burst_s: float = 1.0) -> dict:
        if self.requests is None or self.requests.rate != requests_per_minute / 60.0:
            self.requests = TokenBucket(requests_per_minute / 60.0, burst_s)
        rate = tokens_per_minute / 60.0
        if tokens_per_minute <= 0:
            self.tokens = None
        elif self.tokens is None or self.tokens.rate != rate:
            self.tokens = TokenBucket(rate, burst_s)
        self.max_concurrency = max_concurrency
        self.budget = budget_usd
        self.lease_ttl_s = lease_ttl_s
        return self.state()

    def begin_run(self) -> dict:
        """A step's run starts: forget the previous run's answer keys (what they asked for is in the
        cache, which the step read), and follow the workdir if it was wiped since (no ledger file)."""
        self.persist()
        if not self.workdir.exists(*ledger_path(self.teacher)) and not self.in_flight:
            self.spent, self.by_step = 0.0, {}
        self.answered_keys.clear()
        self.orphaned.clear()
        self.claims.clear()
        return self.state()

    # Leases.

    def _holder(self, holder: str, step: str) -> _Holder:
        h = self.holders.get(holder)
        if h is None:
            h = self.holders[holder] = _Holder(step=step)
        h.expires = time.monotonic() + self.lease_ttl_s
        return h

    def _expire(self, now: float) -> None:
        """Holders silent past their expiry are dead: their slots and reserved dollars come back."""
        for name in [n for n, h in self.holders.items() if h.expires < now]:
            h = self.holders.pop(name)
            self.slot_waiting.discard(name)
            if h.slots or h.reserved:
                self.expired_holders += 1
                self.expired_slots += h.slots
                self.in_flight = max(0, self.in_flight - h.slots)
                self.reserved = max(0.0, self.reserved - h.reserved)
                self.freed.set()
            for key in [k for k, who in self.claims.items() if who == name]:
                del self.claims[key]
                self.orphaned.add(key)

    def heartbeat(self, holder: str) -> None:
        if holder in self.holders:
            self.holders[holder].expires = time.monotonic() + self.lease_ttl_s

    def _recover(self, now: float) -> None:
        """Additive increase: regain rate while no 429 has come for a second."""
        elapsed, self.recover_stamp = now - self.recover_stamp, now
        if self.factor < 1.0 and now - self.last_429 > 1.0:
            self.factor = min(1.0, self.factor + RECOVERY_PER_S * elapsed)

    def _affordable(self, count: int, est_cost: float) -> int:
        if self.budget is None or est_cost <= 0:
            return count
        return int((self.budget - self.spent - self.reserved) // est_cost)

    async def acquire(self, holder: str, step: str, permits: int, slots: int, est_tokens: int,
                      est_cost: float, slot_wait_s: float = SLOT_WAIT_S) -> Lease:
        """Grant `holder` up to `permits` request permits (each one request from the requests bucket,
        `est_tokens` from the tokens bucket and `est_cost` dollars reserved from the budget) and up to
        `slots` concurrency slots, asking for at least one of each kind wanted.

        Waits until that much can be granted, then grants as many as the buckets, the free slots and
        the budget allow at that moment. Refused (0 permits, reason "budget") only by the budget.
        """
        h = self._holder(holder, step)
        granted = 0
        if permits:
            async with self.lock:  # the buckets grant in the order asked (FIFO)
                while True:
                    now = time.monotonic()
                    self._expire(now)
                    affordable = self._affordable(permits, est_cost)
                    if affordable <= 0:
                        if self.reserved > 0 and self.budget is not None and self.budget - self.spent >= est_cost:
                            # What is reserved now may come back unspent: wait for it rather than refuse.
                            await self._wait_freed(0.25)
                            continue
                        return Lease(0, 0, "budget")
                    if now < self.paused_until:
                        await asyncio.sleep(min(self.paused_until - now, 0.25))
                        continue
                    self._recover(now)
                    wait = self.requests.wait_for(1, self.factor)
                    if self.tokens is not None:
                        wait = max(wait, self.tokens.wait_for(est_tokens, self.factor))
                    if wait <= 0:
                        break
                    await asyncio.sleep(min(wait, 0.25))
                granted = max(1, min(permits, affordable, int(self.requests.level)))
                if self.tokens is not None:
                    granted = min(granted, max(1, int(self.tokens.level // max(1, est_tokens))))
                self.requests.level -= granted
                if self.tokens is not None:
                    self.tokens.level -= granted * est_tokens
                self.reserved += granted * est_cost
                h = self._holder(holder, step)
                h.reserved += granted * est_cost
        elif slots:
            # Slots only (no bucket involved, so no queue): wait a little for one, then answer without
            # (the holder may free one of its own meanwhile, and asks again).
            deadline = time.monotonic() + slot_wait_s
            self._expire(time.monotonic())
            while self.in_flight >= self.max_concurrency and time.monotonic() < deadline:
                self.slot_waiting.add(holder)
                await self._wait_freed(deadline - time.monotonic())
                self._expire(time.monotonic())
            h = self._holder(holder, step)
        got_slots = max(0, min(slots, self.max_concurrency - self.in_flight))
        self.in_flight += got_slots
        h.slots += got_slots
        if slots and not got_slots:
            self.slot_waiting.add(holder)  # known to want slots until it next gets some
        else:
            self.slot_waiting.discard(holder)
        active = {n for n, v in self.holders.items() if v.slots > 0} | self.slot_waiting
        return Lease(granted, got_slots, contended=bool(self.slot_waiting - {holder}),
                     fair=max(1, self.max_concurrency // max(1, len(active))))

    async def _wait_freed(self, timeout: float) -> None:
        self.freed.clear()
        try:
            await asyncio.wait_for(self.freed.wait(), timeout=timeout)
        except TimeoutError:
            pass

    def settle(self, holder: str, step: str, count: int = 0, token_correction: int = 0, est_cost: float = 0.0,
               cost: float = 0.0, answered: int = 0, answered_keys: list[str] | None = None,
               failed_keys: list[str] | None = None, slots: int = 0, unused: int = 0, unused_tokens: int = 0) -> None:
        """`count` requests of `holder` ended: correct tokens and spend with their real usage, free the
        dollars reserved for them (`est_cost` in all); `slots` concurrency slots come back; `unused`
        permits were never used (their request permits and tokens are refunded; their reserved dollars
        are part of `est_cost`).
        """
        h = self.holders.get(holder)
        if h is not None:
            h.slots = max(0, h.slots - slots)
            h.reserved = max(0.0, h.reserved - est_cost)
            h.expires = time.monotonic() + self.lease_ttl_s
            self.in_flight = max(0, self.in_flight - slots)
            self.reserved = max(0.0, self.reserved - est_cost)
        # else: the holder was taken for dead and its slots already came back; its spend still counts
        if slots or est_cost:
            self.freed.set()
        self.answered += answered
        self.ended += count
        self.spent += cost
        if count or cost:
            row = self.by_step.setdefault(step, {"spent_usd": 0.0, "requests": 0, "answered": 0})
            row["spent_usd"] += cost
            row["requests"] += count
            row["answered"] += answered
        for key in answered_keys or ():
            self.answered_keys.add(key)
            self.claims.pop(key, None)
            if key in self.orphaned:  # asked again after its holder died: perhaps billed twice
                self.orphaned.discard(key)
                self.reclaimed += 1
        for key in failed_keys or ():
            self.claims.pop(key, None)
        if self.tokens is not None:
            self.tokens.level -= token_correction  # a refund when estimates were high
        if unused:
            self.requests.level = min(self.requests.capacity, self.requests.level + unused)
            if self.tokens is not None:
                self.tokens.level = min(self.tokens.capacity, self.tokens.level + unused_tokens)
        if cost:
            self.dirty = True
            self._maybe_persist()

    def throttle(self, retry_after_s: float) -> None:
        """A 429: pause everyone for Retry-After and slow down."""
        now = time.monotonic()
        self.throttled += 1
        self.paused_until = max(self.paused_until, now + retry_after_s)
        if now - self.last_429 > 1.0:  # one decrease per burst of 429s
            self.factor = max(MIN_RATE_FACTOR, self.factor * 0.8)
        self.last_429 = now

    # Answer keys: never asked for twice.

    def claim(self, holder: str, keys: list[str]) -> dict[str, list[str]]:
        """Sort a batch's answer keys: `send` (now claimed by `holder`), `answered` (answered already in
        this run: do not send), `busy` (a live holder is asking: wait and claim again). `recheck` lists
        the keys of `send` whose last holder died asking: look in the cache before sending them (the
        answer may have been stored just before the death)."""
        self._expire(time.monotonic())
        h = self.holders.setdefault(holder, _Holder())
        h.expires = time.monotonic() + self.lease_ttl_s
        out: dict[str, list[str]] = {"send": [], "answered": [], "busy": [], "recheck": []}
        for key in keys:
            if key in self.answered_keys:
                out["answered"].append(key)
                self.skipped += 1
            elif self.claims.get(key, holder) != holder:
                out["busy"].append(key)
            else:
                if key in self.orphaned:
                    out["recheck"].append(key)
                self.claims[key] = holder
                out["send"].append(key)
        return out

    def release(self, holder: str) -> None:
        """`holder` is idle: the keys it claimed and did not finish (budget refusals) are free again."""
        for key in [k for k, who in self.claims.items() if who == holder]:
            del self.claims[key]

    def mark_answered(self, keys: list[str]) -> None:
        """Keys answered outside the leases (the driver's preflight, a batch's results)."""
        self.answered_keys.update(keys)
        for key in keys:
            self.claims.pop(key, None)
            self.orphaned.discard(key)

    def add_spend(self, step: str, cost: float, requests: int, answered: int) -> None:
        """Spend made outside the leases (a provider batch's results)."""
        self.spent += cost
        row = self.by_step.setdefault(step, {"spent_usd": 0.0, "requests": 0, "answered": 0})
        row["spent_usd"] += cost
        row["requests"] += requests
        row["answered"] += answered
        self.dirty = True
        self.persist()

    # Persistence.

    def _maybe_persist(self) -> None:
        if time.monotonic() - self.last_persist >= PERSIST_EVERY_S:
            self.persist()

    def persist(self) -> dict:
        """Write the spend to the workdir (at most once a second while spending; at every step's end)."""
        if self.dirty:
            self.workdir.write_json({"teacher": self.teacher, "spent_usd": round(self.spent, 9),
                                     "by_step": {s: {k: round(v, 9) if isinstance(v, float) else v for k, v in r.items()}
                                                 for s, r in self.by_step.items()}},
                                    *ledger_path(self.teacher))
            self.dirty = False
        self.last_persist = time.monotonic()
        return self.state()

    def state(self) -> dict:
        return {"answered": self.answered, "ended": self.ended, "in_flight": self.in_flight,
                "spent_usd": self.spent, "reserved_usd": self.reserved, "budget_usd": self.budget,
                "rate_factor": round(self.factor, 3), "throttled": self.throttled, "holders": len(self.holders),
                "expired_holders": self.expired_holders, "expired_slots": self.expired_slots,
                "reclaimed": self.reclaimed, "orphaned": len(self.orphaned), "skipped_answered": self.skipped,
                "by_step": {s: dict(r) for s, r in self.by_step.items()}}


def ledger_name(teacher: str, workdir_uri: str) -> str:
    return f"ledger:{teacher}:{hashlib.sha256(workdir_uri.encode()).hexdigest()[:12]}"


def open_ledger(teacher: Any, workdir: Workdir, budget_usd: float | None, lease_ttl_s: float = 30.0,
                other_spend: float = 0.0) -> Any:
    """The teacher's ledger actor for this workdir (made on first use, found by name after), set to the
    teacher's limits and what is left of `budget_usd` once `other_spend` (other teachers) is counted."""
    from distill_ray.ray_env import on_the_head

    # On the head node (soft): not on a worker node whose loss would take every step's spend along.
    actor = TeacherLedger.options(
        name=ledger_name(teacher.name, workdir.uri), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=on_the_head(),
    ).remote(teacher.name, workdir.uri)
    budget = None if budget_usd is None else max(0.0, budget_usd - other_spend)
    ray.get(actor.configure.remote(teacher.requests_per_minute, teacher.tokens_per_minute, teacher.max_concurrency,
                                   budget, lease_ttl_s))
    return actor


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
