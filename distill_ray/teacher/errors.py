"""Errors of the teacher step that the CLI turns into exit codes (kept free of heavy imports)."""

from distill_ray.errors import BadInput, StepFailed


class TeacherRejected(BadInput):
    """The teacher refuses every request (bad key, URL or model), or its key is not set: exit 2."""


class MissingInput(BadInput, ValueError):
    """An earlier step's artifacts are missing: exit 2."""


class BudgetReached(StepFailed):
    """generate stopped before exceeding budget_usd; resumable: exit 1."""


class TeacherStalled(StepFailed):
    """No answer arrived and no row ended for generate.stall_timeout_s; resumable: exit 1."""
