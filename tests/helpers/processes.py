"""Python subprocesses in which `import ray` fails: what runs there is shown to need no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_RAY = "raise ImportError('ray is blocked here: the training loop must run without it')\n"


def run_without_ray(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`python *args` with a `ray` package that raises on import first on the path; asserts exit 0."""
    blocked = tmp / "no-ray" / "ray"
    blocked.mkdir(parents=True, exist_ok=True)
    (blocked / "__init__.py").write_text(NO_RAY)
    env = {**os.environ, "PYTHONPATH": f"{blocked.parent}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out
