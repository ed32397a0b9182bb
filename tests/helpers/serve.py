"""What a Serve test needs in its workdir: the tokens its app takes and a finished student that passed eval."""

from __future__ import annotations

from pathlib import Path

from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.storage import Workdir
from tests.helpers.models import tiny_model, tiny_tokenizer

TOKEN_ENV = "DISTILL_TEST_SERVE_TOKEN"
TOKEN = "test-serve-token-not-a-secret"  # noqa: S105 - a test's own token for its loopback server
ADMIN_ENV = "DISTILL_TEST_ADMIN_TOKEN"
ADMIN = "test-admin-token-not-a-secret"  # noqa: S105 - the same, for the control endpoints


def save_student(workdir: Path) -> None:
    """A finished (tiny, untrained) student in the workdir, as `distill-ray train` leaves it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), tokenizer.eos_token_id)
    best = workdir / "students" / "mini" / "best"
    model.save_pretrained(best)
    tokenizer.save_pretrained(best)
    write_manifest(Workdir(str(workdir)), StepRecord("students/mini", {}, {}))
    write_eval_result(workdir, passed=True)


def write_eval_result(workdir: Path, passed: bool) -> None:
    """eval/metrics.json as `distill-ray eval` leaves it, for the gate the serve app enforces."""
    result = {"student": "mini", "passed": passed, "parameters": 1000,
              "quality": {"overall": {"relative_quality": 1.0 if passed else 0.5}}}
    Workdir(str(workdir)).write_json({"students": {"mini": result}}, "eval", "metrics.json")
