"""Scoring one answer against another (student vs teacher, or either vs a reference).

Shared by the reference_match and agreement filters, training's holdout metric, eval and serving's
shadow agreement, so every step means the same thing by "the same answer"; and what a held-out answer
is scored against (`holdout_target`), the same for training's check, eval and the replay.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

_PUNCT = string.punctuation + "“”‘’«»…"


def normalize_answer(text: str | None) -> str:
    """Case-folded, whitespace collapsed, surrounding whitespace and punctuation stripped."""
    return " ".join((text or "").casefold().split()).strip(_PUNCT + " ")


def exact_match(answer: str | None, target: str | None) -> float:
    return float((answer or "").strip() == (target or "").strip())


def normalized_match(answer: str | None, target: str | None) -> float:
    return float(normalize_answer(answer) == normalize_answer(target))


def json_match(answer: str | None, target: str | None) -> float:
    """Equal as parsed JSON values (key order and spacing do not matter); unparseable is 0."""
    try:
        return float(json.loads(answer or "") == json.loads(target or ""))
    except (json.JSONDecodeError, TypeError):
        return 0.0


def token_f1(answer: str | None, target: str | None) -> float:
    """SQuAD-style F1 over normalised whitespace tokens."""
    a, t = normalize_answer(answer).split(), normalize_answer(target).split()
    if not a and not t:
        return 1.0
    common = sum((Counter(a) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(t)
    return 2 * precision * recall / (precision + recall)


def regex_metric(pattern: str) -> Callable[[str | None, str | None], float]:
    """Correct when the answer matches `pattern` (the target is ignored)."""
    compiled = re.compile(pattern)
    return lambda answer, _target=None: float(bool(compiled.search(answer or "")))


METRICS: dict[str, Callable[[str | None, str | None], float]] = {
    "exact_match": exact_match, "normalized_match": normalized_match, "json_match": json_match, "token_f1": token_f1,
}


def metric(name: str, pattern: str | None = None) -> Callable[[str | None, str | None], float]:
    if name == "regex":
        if not pattern:
            raise ValueError("metric 'regex' needs a pattern")
        return regex_metric(pattern)
    return METRICS[name]


def holdout_target(row: dict[str, Any], *, trusted_only: bool = True) -> str | None:
    """What a held-out answer is scored against: the row's reference (the log's label) where it has one,
    else the reference teacher's answer. Eval and training's holdout check (`trusted_only`) take the
    teacher's answer only when the filters kept it (`trusted`): scoring a student against an answer the
    filters rejected would count its right answers as wrong. The replay takes any teacher answer (it
    measures agreement with the teacher).

    Args:
        row: `reference`, `teacher` (the answer, None after an error) and `trusted` (absent: trusted).
        trusted_only: refuse a teacher answer the filters rejected.

    Returns:
        The target, or None when the row has none (then it is not scored).
    """
    if row.get("reference"):
        return row["reference"]
    if trusted_only and not row.get("trusted", True):
        return None
    return row["teacher"]
