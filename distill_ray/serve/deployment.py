"""What `distill-ray serve` deploys: which student, whether it may answer clients, and the app's arguments.

Library code shared by the CLI side (`step.py`) and the Serve app (`app.py`, `router.py`): the
student picked from eval's results (or the flywheel's promoted one), the eval gate the app enforces
itself, the slice labels, and `app_args`, everything the app is built from.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from distill_ray.config.schema import PipelineConfig, Rollout, Serve
from distill_ray.eval.decision import ship_choice
from distill_ray.manifest import read_manifest
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput


class ServeRefused(MissingInput):
    """Serving would be unsafe or impossible with this config (exit 2)."""


def _eval_results(workdir: Workdir) -> dict[str, Any]:
    if not workdir.exists("eval", "metrics.json"):
        return {}
    return json.loads(workdir.read_bytes("eval", "metrics.json")).get("students", {})


def promoted(workdir: Workdir) -> dict[str, Any] | None:
    """The student the flywheel (`distill-ray redistill`) found better than the served one, if any."""
    if not workdir.exists("flywheel", "promoted.json"):
        return None
    return json.loads(workdir.read_bytes("flywheel", "promoted.json"))


def pick_student(config: PipelineConfig, workdir: Workdir, mode: str) -> tuple[str, str, dict[str, Any] | None]:
    """(name, checkpoint URI, its eval result) of the student to serve: serve.student, else the
    flywheel's promoted student, else the smallest that passed eval (in shadow mode, where the
    student never answers a client, the best by relative quality even if none passed)."""
    results = _eval_results(workdir)
    if config.serve.student:
        name = config.serve.student
    elif (best := promoted(workdir)) is not None:
        return best["student"], best["checkpoint"], best.get("eval")
    else:
        if not results:
            raise ServeRefused(f"no eval results in {workdir.uri_of('eval')}: run `distill-ray eval` first, or name "
                               "serve.student")
        name = ship_choice(results) or \
            max(results.values(), key=lambda r: r["quality"]["overall"]["relative_quality"])["student"]
    manifest = read_manifest(workdir, f"students/{name}")
    if not manifest or manifest.get("status") != "complete":
        raise ServeRefused(f"student '{name}' has no finished training in {workdir.uri_of('students', name)}")
    return name, workdir.uri_of("students", name, "best"), results.get(name)


def student_gate(config: PipelineConfig, workdir: Workdir, name: str) -> tuple[bool, str]:
    """Whether the student may answer clients (canary, full): it passed eval (or the flywheel's
    round eval that promoted it), or serve.skip_eval_gate says so. The serve app judges this itself."""
    if config.serve.skip_eval_gate:
        return True, "serve.skip_eval_gate is set"
    best = promoted(workdir)
    if best is not None and best["student"] == name:
        return bool(best.get("passed")), f"the flywheel's eval (round {best.get('round')}) " + (
            "passed" if best.get("passed") else "did not pass")
    result = _eval_results(workdir).get(name)
    if result is None:
        return False, f"no eval result for '{name}' in {workdir.uri_of('eval', 'metrics.json')} (run `distill-ray eval`)"
    if not result["passed"]:
        return False, f"'{name}' did not pass eval (serve.skip_eval_gate overrides)"
    return True, "passed eval"


def known_categories(workdir: Workdir) -> list[str]:
    """The prompt set's slices (the metrics' category labels), from prompts/report.json: the categories
    counted in its `category_counts` (`source`, `train`, `holdout`; a flywheel round's report has the
    last two), not that section's own keys."""
    if not workdir.exists("prompts", "report.json"):
        return []
    counts = json.loads(workdir.read_bytes("prompts", "report.json")).get("category_counts") or {}
    return sorted({c for part in ("source", "train", "holdout") for c in counts.get(part) or {}})


def resolve_min_confidence(config: PipelineConfig, result: dict[str, Any] | None) -> float:
    """serve.min_confidence as a number: 'recommended' is eval's threshold for this student (no
    threshold needed: every answer served; none meets the bar: every answer falls back)."""
    value = config.serve.min_confidence
    if value != "recommended":
        return float(value)
    if not result:
        raise ServeRefused("serve.min_confidence: 'recommended' needs this student's eval results (run `distill-ray eval`)")
    threshold = result["threshold"]
    if not threshold["meets_bar"]:
        return 0.0
    return -1e9 if threshold["min_confidence"] is None else float(threshold["min_confidence"])


def _token_sha256(env: str | None, key: str) -> str | None:
    """The SHA-256 of the token in `env` (the token never leaves this process), or of `<env>_SHA256`
    where only the hash is mounted (a RayService)."""
    if env is None:
        return None
    if os.environ.get(env):
        return hashlib.sha256(os.environ[env].encode()).hexdigest()
    digest = os.environ.get(f"{env}_SHA256", "").strip().lower()
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    raise ServeRefused(f"serve.{key}: environment variable {env} (or {env}_SHA256, the token's SHA-256) is not set; set "
                       f"it, or set serve.{key}: null with serve.allow_open_endpoint: true for an open endpoint")


def app_args(config: PipelineConfig, student: str, uri: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config.model_copy(update={"serve": config.serve.model_copy(
        update={"min_confidence": resolve_min_confidence(config, result)})})
    s = config.serve
    if s.student_adapter:
        _check_adapter(config, student, uri)
    if s.mode != "shadow":
        passed, why = student_gate(config, Workdir(config.workdir), student)
        if not passed:
            raise ServeRefused(f"student '{student}' may not answer clients in {s.mode} mode: {why}; serve in shadow "
                               "mode (or with serve.rollout_plan), or set serve.skip_eval_gate: true")
    return {"config": config.model_dump(mode="json", by_alias=True), "student_uri": uri, "student_name": student,
            "token_sha256": _token_sha256(s.auth_token_env, "auth_token_env"),
            "admin_sha256": _token_sha256(s.admin_token_env, "admin_token_env"),
            "generation": time.time(),  # a redeploy's rollout control replaces an earlier one's
            "rollout": configured_rollout(s).model_dump()}


def _check_adapter(config: PipelineConfig, student: str, uri: str) -> None:
    """serve.student_adapter: the student's adapter and base are where vLLM reads them (the flywheel's
    promoted student, not in `students:`, counts as a LoRA student when its adapter is there)."""
    from distill_ray.serve.student import adapter_paths
    from distill_ray.storage import is_s3

    if is_s3(uri):
        raise ServeRefused("serve.student_adapter: vLLM loads the adapter from a local (or shared) folder, and "
                           f"{uri} is on S3; set serve.student_adapter: false to serve the merged checkpoint")
    entry = next((x for x in config.students if x.name == student), None)
    if entry is not None and entry.lora is None:
        raise ServeRefused(f"serve.student_adapter: student '{student}' has no `lora:` (only LoRA students have an "
                           "adapter); set serve.student_adapter: false to serve its checkpoint")
    base, adapter = adapter_paths(uri)
    for path in (os.path.join(adapter, "adapter_config.json"), os.path.join(base, "config.json")):
        if not os.path.exists(path):
            raise ServeRefused(f"serve.student_adapter: {path} does not exist (a LoRA student's training writes its "
                               "base to students/<name>/init and its adapter to students/<name>/best/adapter); run "
                               "`distill-ray train` again, or set serve.student_adapter: false")


def configured_rollout(s: Serve) -> Rollout:
    """The rollout `serve:` starts the app with: its fields of the config's own `Rollout`
    (serve.min_confidence resolved to a number first: `app_args` does)."""
    return Rollout.model_validate({key: getattr(s, key) for key in Rollout.model_fields})
