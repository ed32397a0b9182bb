"""The live rollout, one for the whole app: the `RolloutControl` actor and each router's client of it.

Every router replica syncs with the one named actor every POLL_S: it sends the outcomes of the
student's requests (for `serve.rollout_plan`) and gets the live rollout back. `distill-ray rollout`
and a Serve config update reach the actor through a router; the actor books each change in
`serve/rollout.json` (`record_rollout`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray

from distill_ray.config.schema import Rollout
from distill_ray.storage import Workdir

APP_NAME = "distill"
CONTROL_NAME = f"{APP_NAME}-rollout"
CONTROL_NAMESPACE = "distill-ray"
POLL_S = 0.25


@ray.remote(num_cpus=0)
class RolloutControl:
    """The live rollout and its plan, shared by every router replica (each syncs with it every POLL_S).

    Routers send the outcomes of the student's requests (`plan.Outcome` fields) and get back the
    rollout: with `serve.rollout_plan` set, this actor moves the stages (`plan.RolloutPlan`) and
    books every decision, with its figures, in `serve/rollout.json` and the actor's log.
    `distill-ray rollout` sets the rollout by hand (which pauses a plan) through the admin endpoint;
    a Serve config update of the router's `user_config` (a RayService) reaches it through
    `reconfigure`. A router replica that restarts re-applies the user_config it was deployed with,
    which must not undo a later `distill-ray rollout`: only a user_config that differs from the last
    one applied counts as a change.
    """

    def __init__(self, init: dict[str, Any]):
        from distill_ray.config.schema import Guardrails, RolloutStage
        from distill_ray.serve.plan import RolloutPlan

        self.rollout = Rollout.model_validate(init["rollout"])
        self.config_rollout, self.version = dict(init["rollout"]), 0
        self.workdir, self.student = init.get("workdir"), init.get("student")
        self._generation = float(init.get("generation", 0.0))  # when its deployment was made
        self.gate = init.get("gate") or {"passed": True, "reason": ""}
        self.plan = None
        if init.get("plan"):
            self.plan = RolloutPlan([RolloutStage.model_validate(x) for x in init["plan"]],
                                    Guardrails.model_validate(init.get("guardrails") or {}), self.gate["passed"])
        last = self._last_state()
        if last is not None:  # this deployment's control, re-made after it died: where it was
            self.rollout = Rollout.model_validate({k: last[k] for k in Rollout.model_fields})
            if self.plan is not None and last.get("plan"):
                self.plan.restore(last["plan"]["index"], last["plan"]["held"])
        elif self.plan is not None:
            self._change(self.plan.rollout_changes(), by="plan")

    def _last_state(self) -> dict[str, Any] | None:
        """The last rollout this deployment's control recorded (serve/rollout.json), if any."""
        if not self.workdir:
            return None
        workdir = Workdir(self.workdir)
        if not workdir.exists("serve", "rollout.json"):
            return None
        current = json.loads(workdir.read_bytes("serve", "rollout.json")).get("current") or {}
        return current if current.get("generation") == self._generation and self._generation else None

    def generation(self) -> float:
        return self._generation

    def state(self) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        return self.version, self.rollout.model_dump(), self.plan.status() if self.plan else None

    def sync(self, outcomes: list[tuple]) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """A router's report (outcomes since its last sync) and its answer (the live rollout)."""
        if self.plan is not None and outcomes:
            from distill_ray.serve.plan import Outcome

            decision = self.plan.record([Outcome(*o) for o in outcomes])
            if decision is not None:
                self._decided(decision)
        return self.state()

    def set(self, changes: dict[str, Any], by: str = "rollout") -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """A rollout set by hand (validated by the caller); a moved stage pauses the plan."""
        if self.plan is not None and self.plan.held is None and {"mode", "canary_percent"} & set(changes):
            self._decided(self.plan.pause(f"the rollout was set by hand ({by})"))
        self._change(changes, by)
        return self.state()

    def plan_command(self, command: str) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        if self.plan is None:
            raise ValueError("no serve.rollout_plan in this deployment")
        if command == "pause":
            self._decided(self.plan.pause("paused by an admin"))
        elif command == "resume":
            self._decided(self.plan.resume())
            self._change(self.plan.rollout_changes(), by="plan")
        else:
            raise ValueError(f"plan: 'pause' or 'resume', not {command!r}")
        return self.state()

    def apply_config(self, rollout: dict[str, Any]) -> int:
        if rollout and rollout != self.config_rollout:
            self.config_rollout = dict(rollout)
            self.set(rollout, by="user_config")
        return self.version

    def _change(self, changes: dict[str, Any], by: str) -> None:
        self.rollout = Rollout.model_validate({**self.rollout.model_dump(), **changes})
        self.version += 1
        self._record(by)

    def _decided(self, decision: dict[str, Any]) -> None:
        print(f"rollout plan: {decision['action']} {decision['from']} -> {decision['to']}: {decision['reason']} "
              f"{json.dumps(decision['figures'])}", flush=True)
        if decision["from"] != decision["to"]:
            self._change(self.plan.rollout_changes(), by=f"plan:{decision['action']}")
        self._record(f"plan:{decision['action']}", decision)

    def _record(self, by: str, decision: dict[str, Any] | None = None) -> None:
        if not self.workdir:
            return
        plan = {"index": self.plan.index, "held": self.plan.held} if self.plan is not None else None
        try:
            record_rollout(Workdir(self.workdir), self.rollout.model_dump(), by, self.student, decision,
                           state={"generation": self._generation, "plan": plan})
        except OSError as exc:  # the decision stands; its record is best effort
            print(f"rollout: could not write serve/rollout.json: {exc}", flush=True)


def control_actor(init: dict[str, Any] | None = None):
    """The app's RolloutControl (None when missing and no `init`). With `init`, one of this deployment
    or a later one: an actor left by an earlier deployment (e.g. re-created by its routers as they
    went away) is replaced, so a redeploy's rollout plan is never lost to a stale one."""
    from distill_ray.ray_env import on_this_node

    for _ in range(100):
        try:
            actor = ray.get_actor(CONTROL_NAME, namespace=CONTROL_NAMESPACE)
        except ValueError:
            if init is None:
                return None
            # On the caller's node (the driver's, or a router's): a lost worker node must not take it along.
            actor = RolloutControl.options(name=CONTROL_NAME, namespace=CONTROL_NAMESPACE, lifetime="detached",
                                           get_if_exists=True, scheduling_strategy=on_this_node()).remote(init)
        if init is None:
            return actor
        try:
            generation = ray.get(actor.generation.remote(), timeout=60)
        except ray.exceptions.RayActorError:  # one being killed: its name is not free yet
            time.sleep(0.1)
            continue
        if generation >= init.get("generation", 0.0):
            return actor
        ray.kill(actor, no_restart=True)
        time.sleep(0.1)
    raise RuntimeError(f"the rollout control actor '{CONTROL_NAME}' could not be reached")


class RolloutClient:
    """A router replica's side of the control actor: the live rollout it routes by, the plan's
    status, and the outcomes of the student's requests not yet sent."""

    def __init__(self, init: dict[str, Any]):
        self.init = init
        self.actor = control_actor(init)
        self.version, self.plan_status = -1, None
        self.rollout = Rollout.model_validate(init["rollout"])
        self.outcomes: list[tuple] = []  # for the rollout plan, sent to the control actor at each sync
        self.apply(*ray.get(self.actor.state.remote()))  # a restarted replica resumes the live rollout

    def apply(self, version: int, rollout: dict[str, Any], plan: dict[str, Any] | None) -> bool:
        """Take the actor's answer; True when the rollout changed."""
        self.plan_status = plan
        if version == self.version:
            return False
        self.rollout, self.version = Rollout.model_validate(rollout), version
        return True

    async def sync(self) -> bool:
        """Send the outcomes, take the live rollout; True when it changed."""
        outcomes, self.outcomes = self.outcomes, []
        try:
            return self.apply(*await self.actor.sync.remote(outcomes))
        except Exception:  # noqa: BLE001 - keep serving with the last rollout; the control actor restarts
            self.actor = control_actor(self.init)
            return False

    async def set(self, changes: dict[str, Any]) -> bool:
        return self.apply(*await self.actor.set.remote(changes))

    async def plan_command(self, command: str) -> bool:
        return self.apply(*await self.actor.plan_command.remote(command))

    def apply_config(self, user_config: dict[str, Any]) -> bool:
        """A Serve config update's rollout (already validated), then the live one."""
        if user_config:
            ray.get(self.actor.apply_config.remote(user_config))
        return self.apply(*ray.get(self.actor.state.remote()))

    def outcome(self, latency_ms: float | None, *, fallback: bool = False, error: bool = False,
                agreement: float | None = None) -> None:
        """A student request's outcome, for the rollout plan's guardrails."""
        if self.plan_status is not None and latency_ms is not None:
            self.outcomes.append((self.plan_status["index"], latency_ms, fallback, error, agreement))


def record_rollout(workdir: Workdir, rollout: dict[str, Any], by: str, student: str,
                   decision: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> None:
    """`serve/rollout.json`: the live rollout and its history (who changed what, when; the plan's
    decisions with their figures; `state`: what a re-made control actor resumes from)."""
    history = []
    if workdir.exists("serve", "rollout.json"):
        history = json.loads(workdir.read_bytes("serve", "rollout.json")).get("history", [])
    entry = {**rollout, "student": student, "by": by, "time": time.time(), **(state or {})}
    if decision is not None:
        entry["decision"] = decision
    workdir.write_json({"current": entry, "history": [*history, entry][-200:]}, "serve", "rollout.json")
