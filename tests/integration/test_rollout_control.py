"""The serve app's rollout control actor: a re-made one resumes where its deployment was; a later
deployment's replaces an earlier one's, never the other way round."""

from __future__ import annotations

import json

import pytest
import ray

from distill_ray.config.schema import Serve
from distill_ray.serve.control import control_actor
from distill_ray.serve.deployment import configured_rollout
from distill_ray.serve.step import _reset_control

pytestmark = pytest.mark.usefixtures("ray_local")


def test_a_remade_control_resumes_the_plan_and_a_later_deployment_replaces_it(tmp_path):
    init = {"rollout": configured_rollout(Serve()).model_dump(), "plan": [{"stage": "shadow"}, {"stage": 5}, {"stage": 100}],
            "guardrails": {"min_requests": 2, "window_requests": 2, "min_shadow_agreement": None},
            "gate": {"passed": True, "reason": ""}, "workdir": str(tmp_path), "student": "mini", "generation": 123.0}
    _reset_control()  # none left by an earlier test's app
    made = []
    try:
        made.append(control_actor(init))
        _, rollout, plan = ray.get(made[-1].sync.remote([(0, 10.0, False, False, None)] * 2))
        assert (plan["stage"], rollout["mode"], rollout["canary_percent"]) == ("5%", "canary", 5.0)
        ray.get(made[-1].set.remote({"min_confidence": -0.5}))
        ray.kill(made[-1], no_restart=True)  # lost with its node; a router re-makes it from its deployment
        made.append(control_actor(init))
        _, rollout, plan = ray.get(made[-1].state.remote())
        assert (plan["stage"], rollout["canary_percent"], rollout["min_confidence"]) == ("5%", 5.0, -0.5)
        assert plan["decisions"][-1]["action"] == "restore"
        made.append(control_actor({**init, "generation": 124.0}))  # a redeploy: its own plan, from the start
        _, rollout, plan = ray.get(made[-1].state.remote())
        assert (plan["stage"], rollout["mode"]) == ("shadow", "shadow")
        assert ray.get(control_actor(init).generation.remote()) == 124.0  # a stale router does not undo it
        history = json.loads((tmp_path / "serve" / "rollout.json").read_text())["history"]
        assert [h["by"] for h in history][:2] == ["plan", "plan:advance"]
    finally:
        for actor in made:
            ray.kill(actor, no_restart=True)
