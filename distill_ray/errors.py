"""Errors shared by every step."""


class StepFailed(RuntimeError):
    """The step ran and failed (exit 1); the message says what to do next (often: run it again)."""
