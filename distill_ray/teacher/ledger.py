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

The rate limits are `limiter.RateLimiter`'s; a holder's side of the ledger is `lease_client.LeaseClient`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import ray

from distill_ray.storage import Workdir
from distill_ray.teacher.lease_client import SLOT_WAIT_S, LeaseClient
from distill_ray.teacher.limiter import RateLimiter

NAMESPACE = "distill-ray"
PERSIST_EVERY_S = 1.0


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
        self.limiter = RateLimiter()
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
        self.budget: float | None = None
        self.configure(1e9, 0, 4096, None)

    # Settings, per step: the step starting states its limits (a rerun may raise the budget).

    def configure(self, requests_per_minute: float, tokens_per_minute: float, max_concurrency: int,
                  budget_usd: float | None, lease_ttl_s: float = 30.0, burst_s: float = 1.0) -> dict:
        self.limiter.configure(requests_per_minute, tokens_per_minute, burst_s)
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
                    wait = self.limiter.wait(est_tokens)  # a 429's pause, then the buckets
                    if wait <= 0:
                        break
                    await asyncio.sleep(min(wait, 0.25))
                granted = self.limiter.take(min(permits, affordable), est_tokens)
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
        self.limiter.settle(token_correction, unused, unused_tokens)  # a refund when estimates were high
        if cost:
            self.dirty = True
            self._maybe_persist()

    def throttle(self, retry_after_s: float) -> None:
        """A 429: pause everyone for Retry-After and slow down."""
        self.limiter.throttle(retry_after_s)

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
                "rate_factor": round(self.limiter.factor, 3), "throttled": self.limiter.throttled, "holders": len(self.holders),
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


__all__ = ["NAMESPACE", "Lease", "LeaseClient", "TeacherLedger", "ledger_name", "ledger_path", "open_ledger", "read_spend",
           "spend_by_step"]
