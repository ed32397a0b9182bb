"""The Ray Serve application of step 7: the student behind a safety net, OpenAI-compatible.

Two deployments:
- `student`: the checkpoint in the serve engine (`student.py`): Ray's own LLM deployment
  (`ray.serve.llm`'s LLMServer, vLLM's engine: its CPU build here, the CUDA build on GPU nodes, with
  the engine's GPUs, accelerator type and tensor-parallel placement group), or `StudentServer`
  (`student.py`) with `serve.engine.backend: transformers`; each answer comes with its confidence (mean token
  logprob, from the logprobs the engine returns). Replicas and autoscaling come from `serve:`.
- `Router` (the HTTP ingress): `/v1/chat/completions` (plain and streaming SSE), `/v1/models`,
  `/v1/distill/stats`, `/health`. Per request it picks the path (`policy.py`: shadow, sticky canary,
  full), calls the student deployment and/or the teacher API, falls back to the teacher when the
  student is unsure, slow or failing, and says who answered in `x-served-by` (and why not the
  student in `x-fallback-reason`). The rollout (mode, canary share, confidence threshold) is the
  deployment's `user_config`: `distill-ray rollout` changes it on the live replicas, no restart.

The pieces: `router.py` (HTTP), `routing.py` (who answers, fallback), `control.py` (the live
rollout), `teacher.py` (the teacher's calls), `metrics.py`, `logs.py`; the wire format is
`distill_ray.openai_api`'s.

Streaming is real for the student: its first `serve.stream_judge_tokens` tokens are judged (their
mean logprob against the threshold, within the latency budget) and then sent at once, and every
later token leaves as the engine decodes it; an answer judged unsure is replaced by the teacher's
before anything was sent. The teacher's answers (shadow, fallbacks) are sent as chunks once whole.
Metrics go to Ray's Prometheus export (`ray.util.metrics`); request logs to
`<workdir>/serve/logs/` (`logs.py`).
"""

from __future__ import annotations

import time
from typing import Any

from distill_ray.serve.control import APP_NAME
from distill_ray.serve.router import Router

__all__ = ["APP_NAME", "Router", "build_app"]


def build_app(args: dict[str, Any]):
    """The Serve application (also the import path of a RayService / `serve deploy` config).

    args: what `distill-ray serve` passes ({config: the pipeline config as a dict, student_uri,
    student_name, rollout, token_sha256, admin_sha256}), or, in a Serve config file, {config: a
    config path, overrides: [...]}: the student is then picked as `distill-ray serve` would, and the
    tokens' hashes read on the node from `<serve.auth_token_env>_SHA256` and
    `<serve.admin_token_env>_SHA256` (a RayService mounts only the hashes; see cluster/kuberay)."""
    from distill_ray.config.schema import PipelineConfig

    if isinstance(args.get("config"), str):
        from distill_ray.config import load_config
        from distill_ray.serve.deployment import app_args, pick_student
        from distill_ray.storage import Workdir

        loaded = load_config(args["config"], list(args.get("overrides") or []))
        name, uri, result = pick_student(loaded, Workdir(loaded.workdir), loaded.serve.mode)
        args = app_args(loaded, name, uri, result)
    config = PipelineConfig.model_validate(args["config"])
    s = config.serve
    if s.num_replicas == "auto":
        options: dict[str, Any] = {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                                          "target_ongoing_requests": 8}}
    else:
        options = {"num_replicas": s.num_replicas}
    if s.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = s.max_replicas_per_node
    if s.engine.backend == "vllm":  # Ray's own LLM deployment (ray.serve.llm) with vLLM's engine
        from distill_ray.serve.student import llm_deployment

        student = llm_deployment(args["student_uri"], args["student_name"], s, options)
    else:
        from distill_ray.engine import ray_options

        actor = ray_options(s.engine)  # the engine's CPUs, GPUs and accelerator type
        if s.student_resources:
            actor["resources"] = dict(s.student_resources)
        from distill_ray.serve.student import StudentServer

        student = StudentServer.options(**options, ray_actor_options=actor).bind(
            args["student_uri"], args["student_name"], s.engine.model_dump(mode="json"))
    router: dict[str, Any] = {"user_config": args.get("rollout") or {}, "num_replicas": s.router_replicas}
    if s.router_resources:
        router["ray_actor_options"] = {**Router.ray_actor_options, "resources": dict(s.router_resources)}
    return Router.options(**router).bind(student, args["config"], args["student_name"], args.get("token_sha256"),
                                         args.get("admin_sha256"), args.get("generation", time.time()))
