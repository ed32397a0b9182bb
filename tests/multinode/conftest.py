"""The multi-node suite's environment, set before any node starts so that every node inherits it
(as pods get theirs from a Kubernetes secret)."""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("DISTILL_TEST_TEACHER_KEY", "sk-test-" + secrets.token_hex(12))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
