"""The pipeline config: the root model over one pydantic model per section, all strict (unknown keys are errors).

The sections live in their own modules (task, teachers, filters, train, eval, serve); this module
holds the root, its cross-section checks and the rules several steps read (which teacher is the
reference and which the fallback, the training metric), and re-exports every section's names.
Every field carries a description, and the defaults run on a laptop (local Ray, local files, the
offline teacher).
"""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator

from distill_ray.config.base import NAME_PATTERN, SECRET_KEYS, Strict
from distill_ray.config.eval import Eval
from distill_ray.config.filters import (
    AgreementFilter,
    Filter,
    GroundedFilter,
    JsonSchemaFilter,
    MinMeanLogprobFilter,
    PythonFilter,
    ReferenceMatchFilter,
    RegexFilter,
)
from distill_ray.config.serve import (
    CanaryPercent,
    Drift,
    Flywheel,
    Guardrails,
    LatencyBudgetMs,
    MinConfidence,
    Rollout,
    RolloutMode,
    RolloutStage,
    Serve,
)
from distill_ray.config.task import Bar, FewShotTurn, Prompts, Task
from distill_ray.config.teachers import Engine, Generate, Teacher, offline_teacher
from distill_ray.config.train import DeepSpeed, LayerDrop, Lora, Student, Train

__all__ = [
    "NAME_PATTERN", "SECRET_KEYS", "AgreementFilter", "Bar", "CanaryPercent", "DeepSpeed", "Drift", "Engine", "Eval",
    "FewShotTurn", "Filter", "Flywheel", "Generate", "GroundedFilter", "Guardrails", "JsonSchemaFilter",
    "LatencyBudgetMs", "LayerDrop", "Lora", "MinConfidence", "MinMeanLogprobFilter", "PipelineConfig", "Prompts",
    "PythonFilter", "ReferenceMatchFilter", "RegexFilter", "Rollout", "RolloutMode", "RolloutStage", "Serve",
    "Strict", "Student", "Task", "Teacher", "Train",
]


class PipelineConfig(Strict):
    """The whole pipeline: every `distill-ray` verb reads this one file."""

    name: str = Field("support-orders", pattern=NAME_PATTERN, description="Run name (used in job ids).")
    workdir: str = Field("runs/support-orders", description="Local path or s3://bucket/prefix for all artifacts.")
    task: Task = Field(default_factory=Task, description="Step 1: what the student must do and the quality bar.")
    prompts: Prompts = Field(default_factory=Prompts, description="Step 2: the prompt set drawn from the logs.")
    teachers: list[Teacher] = Field(
        default_factory=offline_teacher, min_length=1, description="Step 3: the teacher LLMs; the first is the "
        "reference (eval's targets), and the serve fallback unless serve.teacher names another. Default: SmolLM2 "
        "run locally (launch: smollm2).")
    budget_usd: float | None = Field(None, gt=0, description="Generation stops cleanly before exceeding this.")
    generate: Generate = Field(default_factory=Generate, description="Step 3: how the teacher calls are run.")
    filters: list[Filter] = Field(
        default_factory=list, description="Step 4: checks every teacher answer must pass to be trained on (each "
        "with its `kind`); none: every answer without an error is kept.")
    students: list[Student] = Field(
        default_factory=lambda: [Student(name="small", base_model="smollm2", layer_drop=LayerDrop(keep_every=3))],
        min_length=1, description="Step 5: the students to train; default: SmolLM2-135M keeping every third layer and the last.",
    )
    train: Train = Field(default_factory=Train, description="Step 5: how the students are trained.")
    eval: Eval = Field(default_factory=Eval, description="Step 6: the students against the teacher on the holdout.")
    serve: Serve = Field(default_factory=Serve, description="Step 7: serving the student behind the teacher.")
    drift: Drift = Field(default_factory=Drift, description="When served traffic has moved away from the training "
                         "prompts.")
    flywheel: Flywheel = Field(default_factory=Flywheel, description="Distilling again from the served traffic.")

    def teacher(self, name: str | None = None) -> Teacher:
        """The teacher named `name`; None: the reference teacher (the first in `teachers`).

        Raises:
            ValueError: no teacher has that name (validation already refuses such names in the config).
        """
        if name is None:
            return self.teachers[0]
        for teacher in self.teachers:
            if teacher.name == name:
                return teacher
        raise ValueError(f"'{name}' is not a configured teacher ({', '.join(t.name for t in self.teachers)})")

    @property
    def reference_teacher(self) -> Teacher:
        """The teacher the students are measured against: its holdout answers are eval's and the replay's
        targets where a prompt has no reference, and the summary's teacher row. The first in `teachers`."""
        return self.teacher(None)

    @property
    def fallback_teacher(self) -> Teacher:
        """The teacher the serve app answers with when the student does not (fallback, shadow, the teacher's
        share of a canary): `serve.teacher`, default the reference teacher."""
        return self.teacher(self.serve.teacher)

    @property
    def judge_teacher(self) -> Teacher:
        """The teacher that judges answers for task.metric 'llm_judge': `eval.judge_teacher`, default the
        reference teacher."""
        return self.teacher(self.eval.judge_teacher)

    def train_for(self, student: Student) -> Train:
        """`train:` with the student's own overrides applied."""
        if not student.train:
            return self.train
        return Train.model_validate({**self.train.model_dump(mode="json", by_alias=True), **student.train})

    @model_validator(mode="after")
    def _vllm_replicas_per_node(self) -> PipelineConfig:
        if self.serve.max_replicas_per_node is not None and self.serve.engine.backend == "vllm":
            raise ValueError(
                "serve.max_replicas_per_node: Ray Serve refuses it for replicas with placement groups, which "
                "ray.serve.llm gives every vLLM replica; spread them with serve.student_resources instead (a custom "
                "resource each node has one unit of, e.g. {worker_node: 1}), or set serve.engine.backend: transformers")
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        for kind, items in (("teachers", self.teachers), ("students", self.students)):
            names = [item.name for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: names must be unique, repeated: {', '.join(dupes)}")
        teacher_names = {t.name for t in self.teachers}
        for key, value in (("serve.teacher", self.serve.teacher), ("eval.judge_teacher", self.eval.judge_teacher)):
            if value is not None and value not in teacher_names:
                raise ValueError(f"{key} '{value}' is not a configured teacher ({', '.join(sorted(teacher_names))})")
        for student in self.students:
            try:
                self.train_for(student)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"students.{student.name}.train: {problems}") from None
        if self.serve.student is not None and self.serve.student not in {s.name for s in self.students}:
            raise ValueError(f"serve.student '{self.serve.student}' is not a configured student")
        s = self.serve
        if s.student_adapter:
            if s.engine.backend != "vllm":
                raise ValueError("serve.student_adapter: adapters are served by vLLM; set serve.engine.backend: vllm")
            chosen = [x for x in self.students if x.name == s.student] if s.student else self.students
            if not any(x.lora for x in chosen):
                raise ValueError("serve.student_adapter: the served student has no `lora:` (only LoRA students have "
                                 "an adapter)" if s.student else "serve.student_adapter: no student has `lora:`")
        served = self.fallback_teacher
        if served.max_tokens > s.max_tokens:
            raise ValueError(f"serve.max_tokens ({s.max_tokens}) is below teachers.{served.name}.max_tokens "
                             f"({served.max_tokens}), which clients of the teacher send; raise serve.max_tokens")
        if not s.allow_open_endpoint:
            for key in ("auth_token_env", "admin_token_env"):
                if getattr(s, key) is None:
                    raise ValueError(f"serve.{key}: null leaves the endpoint open to anyone who reaches it; name the "
                                     "environment variable holding the token, or set serve.allow_open_endpoint: true")
        if s.auth_token_env is not None and s.auth_token_env == s.admin_token_env:
            raise ValueError("serve.admin_token_env must name another variable than serve.auth_token_env (the admin "
                             "token is apart from the API clients' token)")
        for i, stage in enumerate(s.rollout_plan or []):
            try:
                Guardrails.model_validate({**s.guardrails.model_dump(), **stage.guardrails})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"serve.rollout_plan.{i}.guardrails: {problems}") from None
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError("serve.min_replicas must not exceed serve.max_replicas")
        uses_reference = any(getattr(f, "kind", "") == "reference_match" for f in self.filters)
        if uses_reference and not self.prompts.reference_field:
            raise ValueError("filters: 'reference_match' needs prompts.reference_field (the ground-truth field)")
        return self
