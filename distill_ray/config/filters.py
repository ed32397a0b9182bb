"""Step 4: the filters a teacher answer must pass to become training data (one model per `kind`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from distill_ray.config.base import Regex, Strict


class MinMeanLogprobFilter(Strict):
    kind: Literal["min_mean_logprob"] = Field(
        description="Drop answers the teacher was unsure of (needs teachers[].logprobs: an answer without logprobs is "
        "dropped).")
    threshold: float = Field(le=0, description="Drop answers whose mean token logprob is below this.")


class RegexFilter(Strict):
    kind: Literal["regex"] = Field(description="Keep answers that match a regular expression.")
    pattern: Regex = Field(description="Python regular expression the completion must match (re.search).")
    invert: bool = Field(False, description="Drop answers that DO match instead.")


class JsonSchemaFilter(Strict):
    kind: Literal["json_schema"] = Field(description="Keep answers that are JSON valid under a schema.")
    schema_: dict[str, Any] = Field(alias="schema", description="JSON Schema the completion must satisfy.")


class ReferenceMatchFilter(Strict):
    kind: Literal["reference_match"] = Field(
        description="Keep answers that match the prompt's reference (prompts.reference_field); prompts without one "
        "pass.")
    metric: Literal["exact_match", "normalized_match", "json_match", "token_f1"] = Field(
        "normalized_match", description="How the answer is scored against the reference.")
    min_score: float = Field(1.0, ge=0, le=1, description="Drop answers that score below this.")


class GroundedFilter(Strict):
    """For extraction tasks: what the answer quotes must appear in the prompt (a teacher that copies
    a value from its few-shot examples, or invents one, is dropped)."""

    kind: Literal["grounded"] = Field(description="Keep answers whose quoted spans appear in the prompt.")
    pattern: Regex | None = Field(
        None, description="Regular expression for the spans of the answer that must appear in the prompt's user "
                          "turns (default: the whole answer).")
    allow: list[str] = Field(default_factory=list, description="Answers exempt from the check, e.g. [NONE].")
    ignore_case: bool = Field(True, description="Compare case-insensitively.")


class AgreementFilter(Strict):
    kind: Literal["agreement"] = Field(description="Keep answers the teachers (or samples) agree on.")
    min_agreement: float = Field(
        1.0, gt=0, le=1, description="Share of teachers (or samples) that must give the same normalised answer."
    )


class PythonFilter(Strict):
    kind: Literal["python"] = Field(description="Keep what a function of your own keeps.")
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:function' taking a teacher row (dict) and returning None to keep it or a reason.",
    )


Filter = Annotated[
    MinMeanLogprobFilter | RegexFilter | JsonSchemaFilter | ReferenceMatchFilter | GroundedFilter | AgreementFilter
    | PythonFilter,
    Field(discriminator="kind"),
]
