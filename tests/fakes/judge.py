"""A scripted LLM judge for the fake teacher (`FakeTeacherConfig(answer_fn="tests.fakes.judge:lenient")`).

It reads the judge prompt of `distill_ray.eval.judge` and says 1 when the candidate mentions the
reference's order number (or both say NONE), however it is worded: more lenient than
normalized_match, so a test can tell the judge's verdicts from the string metric's.
"""

from __future__ import annotations

import re

_ORDER = re.compile(r"ORD-\d{6}", re.IGNORECASE)


def verdict(candidate: str, reference: str) -> str:
    wanted = _ORDER.search(reference)
    if wanted:
        return "1" if wanted.group(0).upper() in candidate.upper() else "0"
    return "1" if "NONE" in candidate.upper() and "NONE" in reference.upper() else "0"


def lenient(text: str) -> str:
    match = re.search(r"Reference answer:\n(.*)\n\nCandidate answer:\n(.*)\Z", text, re.DOTALL)
    if not match:
        return "I cannot tell."  # not a judge prompt: an unreadable verdict
    return verdict(match.group(2), match.group(1))
