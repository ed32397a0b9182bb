"""The filters of `filters:`, each a check on one teacher row that returns None (keep) or a reason.

`agreement` looks across rows of the same prompt (several teachers, or several samples of one);
every other filter looks at one row. None of them calls the teacher.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import (
    AgreementFilter,
    GroundedFilter,
    JsonSchemaFilter,
    MinMeanLogprobFilter,
    PythonFilter,
    ReferenceMatchFilter,
    RegexFilter,
)
from distill_ray.errors import BadInput
from distill_ray.metrics import metric, normalize_answer

Row = dict[str, Any]
Check = Callable[[Row], str | None]


class FilterError(BadInput, ValueError):
    """A filter cannot be built (a python filter that does not import, a bad schema): exit 2."""


def load_python_filter(spec: str) -> Callable[[Row], str | None]:
    module_name, _, function_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise FilterError(f"filters: python filter '{spec}' cannot be loaded: {exc}") from exc


def build_check(spec: Any) -> Check | None:
    """A per-row check for a filter config (None for `agreement`, which needs the whole prompt group)."""
    if isinstance(spec, MinMeanLogprobFilter):
        def check(row: Row) -> str | None:
            mean = row.get("mean_logprob")
            if mean is None:
                return "min_mean_logprob: the teacher returned no logprobs"
            return None if mean >= spec.threshold else f"min_mean_logprob: {mean:.3f} < {spec.threshold}"
        return check
    if isinstance(spec, RegexFilter):
        compiled = re.compile(spec.pattern)

        def check(row: Row) -> str | None:
            matched = bool(compiled.search(row.get("completion") or ""))
            if matched == spec.invert:
                return f"regex: {'matches' if spec.invert else 'does not match'} {spec.pattern}"
            return None
        return check
    if isinstance(spec, JsonSchemaFilter):
        import jsonschema

        try:
            validator = jsonschema.Draft202012Validator(spec.schema_)
            jsonschema.Draft202012Validator.check_schema(spec.schema_)
        except jsonschema.SchemaError as exc:
            raise FilterError(f"filters: json_schema is not a valid JSON Schema: {exc.message}") from exc

        def check(row: Row) -> str | None:
            try:
                value = json.loads(row.get("completion") or "")
            except json.JSONDecodeError:
                return "json_schema: not JSON"
            error = next(iter(validator.iter_errors(value)), None)
            return None if error is None else f"json_schema: {error.message[:120]}"
        return check
    if isinstance(spec, ReferenceMatchFilter):
        score = metric(spec.metric)

        def check(row: Row) -> str | None:
            if row.get("reference") is None:
                return None  # no ground truth for this prompt: nothing to check against
            value = score(row.get("completion"), row["reference"])
            return None if value >= spec.min_score else f"reference_match: {spec.metric} {value:.2f} < {spec.min_score}"
        return check
    if isinstance(spec, GroundedFilter):
        return _grounded_check(spec)
    if isinstance(spec, PythonFilter):
        function = load_python_filter(spec.function)

        def check(row: Row) -> str | None:
            reason = function(dict(row))
            return None if reason in (None, False, "") else f"python {spec.function}: {reason}"
        return check
    if isinstance(spec, AgreementFilter):
        return None
    raise FilterError(f"filters: unknown filter {spec!r}")


def _grounded_check(spec: GroundedFilter) -> Check:
    flags = re.IGNORECASE if spec.ignore_case else 0
    spans = re.compile(spec.pattern, flags) if spec.pattern else None
    fold = (lambda text: text.casefold()) if spec.ignore_case else (lambda text: text)  # noqa: E731
    allowed = {fold(a.strip()) for a in spec.allow}

    def check(row: Row) -> str | None:
        answer = (row.get("completion") or "").strip()
        if fold(answer) in allowed:
            return None
        source = fold("\n".join(str(m.get("content") or "") for m in row.get("messages") or [] if m.get("role") == "user"))
        quoted = [m.group(0) for m in spans.finditer(answer)] if spans else [answer]
        missing = [q for q in quoted if fold(q) not in source]
        if missing:
            return f"grounded: {missing[0][:60]!r} is not in the prompt"
        return None
    return check


def agreement_reasons(rows: list[Row], spec: AgreementFilter) -> dict[int, str]:
    """Rows (by index) whose prompt's answers disagree: the majority must reach `min_agreement`,
    and only rows giving the majority answer are kept."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not row.get("error"):
            groups[row["id"]].append(index)
    reasons = {}
    for indices in groups.values():
        answers = Counter(normalize_answer(rows[i].get("completion")) for i in indices)
        top, count = answers.most_common(1)[0]
        share = count / len(indices)
        for i in indices:
            if share < spec.min_agreement:
                reasons[i] = f"agreement: {share:.2f} < {spec.min_agreement} of {len(indices)} answers agree"
            elif normalize_answer(rows[i].get("completion")) != top:
                reasons[i] = "agreement: differs from the majority answer"
    return reasons
