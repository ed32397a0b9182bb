"""Step manifests: what a step read (with content hashes), the config it ran with, and what it made.

`manifest.json` is written last and atomically, so its presence with status `complete` means the
step's artifacts are whole. `run` and every verb use `up_to_date` to skip a step whose inputs and
config have not changed since it completed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from distill_ray import __version__
from distill_ray.storage import Workdir, json_hash

MANIFEST = "manifest.json"


@dataclass
class StepRecord:
    """What a step is about to do; filled in as it runs, then written as its manifest."""

    step: str
    inputs: dict[str, str]  # name or URI -> content hash
    config: dict[str, Any]  # the config section(s) the step ran with (no secrets: configs hold none)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        return json_hash({"inputs": self.inputs, "config": self.config})

    def to_json(self, status: str) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": status,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "config": self.config,
            "counts": self.counts,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **self.extra,
            "version": __version__,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def read_manifest(workdir: Workdir, step: str) -> dict[str, Any] | None:
    return workdir.read_json(step, MANIFEST)


def write_manifest(workdir: Workdir, record: StepRecord, status: str = "complete") -> dict[str, Any]:
    """Write `<workdir>/<step>/manifest.json` atomically; `status` is complete or partial."""
    if status not in ("complete", "partial"):
        raise ValueError(f"manifest status must be complete or partial, not {status!r}")
    doc = record.to_json(status)
    workdir.write_json(doc, record.step, MANIFEST)
    return doc


def up_to_date(workdir: Workdir, record: StepRecord) -> dict[str, Any] | None:
    """The step's manifest if it completed with exactly these inputs and config, else None."""
    manifest = read_manifest(workdir, record.step)
    if manifest and manifest.get("status") == "complete" and manifest.get("fingerprint") == record.fingerprint:
        return manifest
    return None
