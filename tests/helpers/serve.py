"""What a Serve test needs in its workdir: the tokens its app takes and a finished student that passed eval."""

from __future__ import annotations

from distill_ray.testing.tiny_models import save_finished_student as save_student
from distill_ray.testing.tiny_models import write_eval_result

__all__ = ["ADMIN", "ADMIN_ENV", "TOKEN", "TOKEN_ENV", "save_student", "write_eval_result"]

TOKEN_ENV = "DISTILL_TEST_SERVE_TOKEN"
TOKEN = "test-serve-token-not-a-secret"  # noqa: S105 - a test's own token for its loopback server
ADMIN_ENV = "DISTILL_TEST_ADMIN_TOKEN"
ADMIN = "test-admin-token-not-a-secret"  # noqa: S105 - the same, for the control endpoints
