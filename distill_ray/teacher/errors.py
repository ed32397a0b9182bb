"""Errors of the teacher step that the CLI turns into exit codes (kept free of heavy imports)."""


class TeacherRejected(Exception):
    """The teacher refuses every request (bad key, URL or model), or its key is not set: exit 2."""


class MissingInput(ValueError):
    """An earlier step's artifacts are missing: exit 2."""


class BudgetReached(RuntimeError):
    """generate stopped before exceeding budget_usd; resumable: exit 1."""


class TeacherStalled(RuntimeError):
    """No answer arrived and no row ended for generate.stall_timeout_s; resumable: exit 1."""
