"""The two kinds of error the `distill-ray` command turns into an exit code (caught once, in cli.py).

Every error a step raises for the user to act on subclasses one of them:
- `BadInput` (exit 2): the config, data, arguments or cluster address are wrong; nothing useful ran.
  The message names the key, file or line to fix.
- `StepFailed` (exit 1): the step ran and failed; the message says what to do next (often: run it again).
"""


class BadInput(Exception):
    """Bad input: a config key, a file, an argument, a missing model or earlier step (exit 2)."""

    exit_code = 2


class StepFailed(RuntimeError):
    """The step ran and failed (exit 1); the message says what to do next (often: run it again)."""

    exit_code = 1
