"""Scoring one answer against another (student vs teacher, or either vs a reference).

Shared by the reference_match and agreement filters, training's holdout metric, eval and serving's
shadow agreement, so every step means the same thing by "the same answer".
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable

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
