"""Never pay twice: every teacher answer is made durable under the workdir the moment it arrives.

The key is a hash of (teacher name, model, sampling parameters, sample index, request messages),
so a changed prompt or setting is a new answer and everything else is found again. Storage:
- local workdir: each worker appends JSON lines to its own segment file and flushes every answer
  to the operating system at once, so a killed process loses nothing (a SIGKILL can at most cut
  the last line, which `load` skips); fsync, which guards against the machine itself going down,
  is grouped to at most one per 100 ms (one per answer capped throughput at ~200 answers/s);
- S3: one object per answer (an S3 PUT is atomic; objects cannot be appended to).
Answers that ended in an error are not cached: a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

from distill_ray.config.schema import Teacher
from distill_ray.storage import Workdir, is_s3

CACHE_DIR = ("teacher", "cache")
FSYNC_EVERY_S = 0.1


def answer_key(teacher: Teacher, messages: list[dict[str, str]], sample: int) -> str:
    params = {"teacher": teacher.name, "model": teacher.model, "temperature": teacher.temperature,
              "max_tokens": teacher.max_tokens, "logprobs": teacher.logprobs, "top_logprobs": teacher.top_logprobs,
              "sample": sample, "messages": messages}
    # Options that change the answer join the key only when set, so caches made before they existed stay valid.
    for name in ("reasoning_effort", "response_format", "extra_body"):
        if getattr(teacher, name):
            params[name] = getattr(teacher, name)
    return hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def messages_digest(messages: list[dict[str, str]]) -> str:
    """SHA-256 of a conversation as the teacher was sent it: what a serve request log line records of
    the teacher's request, so that the flywheel can tell which logged answers `answer_key` matches."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    """Durable answers of one teacher under `<workdir>/teacher/cache/<teacher>/` (or `parts`, e.g. the
    eval's judge calls)."""

    def __init__(self, workdir: Workdir, teacher: str, parts: tuple[str, ...] | None = None):
        self.workdir = workdir
        self.teacher = teacher
        self.parts = tuple(parts) if parts else (*CACHE_DIR, teacher)
        self._segment = None
        self._synced = 0.0

    def put(self, record: dict[str, Any]) -> None:
        """Store one answer; it is durable when this returns."""
        line = json.dumps(record, ensure_ascii=False)
        if is_s3(self.workdir.uri):
            self.workdir.write_bytes(line.encode(), *self.parts, f"{record['key']}.json")
            return
        if self._segment is None:
            path = self.workdir.uri_of(*self.parts, f"segment-{uuid.uuid4().hex[:12]}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._segment = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        self._segment.write(line + "\n")
        self._segment.flush()
        now = time.monotonic()
        if now - self._synced >= FSYNC_EVERY_S:
            os.fsync(self._segment.fileno())
            self._synced = now

    def close(self) -> None:
        if self._segment is not None:
            os.fsync(self._segment.fileno())
            self._segment.close()
            self._segment = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Every cached answer by key (a line cut short by a crash is skipped)."""
        found: dict[str, dict[str, Any]] = {}
        for name in sorted(self.workdir.list_files(*self.parts)):
            data = self.workdir.read_bytes(*self.parts, name).decode("utf-8", "replace")
            for line in data.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a segment whose writer was killed mid-write
                found.setdefault(record["key"], record)
        return found
