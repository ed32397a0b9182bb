"""The config documents itself: every field of every section has a description, and docs/config.md is
what `python -m distill_ray.config.reference` writes from the schema today."""

from __future__ import annotations

import subprocess
import sys
import typing

from pydantic import BaseModel, Field

from distill_ray.config.reference import reference
from distill_ray.config.schema import PipelineConfig
from tests.conftest import ROOT

REGENERATE = "python -m distill_ray.config.reference > docs/config.md"


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _reachable(root: type[BaseModel]) -> list[type[BaseModel]]:
    """`root` and every model its fields hold, however deep."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.append(model)
            todo.extend(m for field in model.model_fields.values() for m in _models(field.annotation))
    return seen


def fields_without_description(root: type[BaseModel]) -> list[str]:
    """`Model.field` of every field without a description, in every model reachable from `root`."""
    return sorted(f"{model.__name__}.{name}" for model in _reachable(root)
                  for name, field in model.model_fields.items() if not (field.description or "").strip())


def test_every_config_field_has_a_description():
    assert fields_without_description(PipelineConfig) == []


def test_the_walk_finds_a_field_without_a_description_however_deep():
    class Leaf(BaseModel):
        fine: int = Field(0, description="described")
        bare: int = 0

    class Root(BaseModel):
        items: list[Leaf] | None = Field(None, description="a list of leaves")
        blank: str = Field("", description="  ")

    assert fields_without_description(Root) == ["Leaf.bare", "Root.blank"]


def test_docs_config_md_is_what_the_schema_writes_today():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == reference(), f"docs/config.md is out of date with the schema: run `{REGENERATE}`"


def test_the_reference_has_every_key_with_its_type_default_and_description():
    text = reference()
    keys = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    for model in _reachable(PipelineConfig):  # every field of every section has its row
        for name, field in model.model_fields.items():
            assert any(key.rsplit(".", 1)[-1] == (field.alias or name) for key in keys), f"{model.__name__}.{name}"
    assert {k for k in keys if k.endswith(".engine.backend")} == {"teachers[].engine.backend", "eval.engine.backend",
                                                                  "serve.engine.backend"}
    assert all(line.count(" | ") == 3 for line in text.splitlines() if line.startswith("| `"))  # 4 cells, | escaped
    assert ("| `train.deepspeed.zero_stage` | 0 or 1 or 2 or 3 | `2` | ZeRO stage: 0 plain data parallel, "
            in text)
    assert "| `teachers[].engine.backend` | 'vllm' or 'transformers' | `\"vllm\"` |" in text
    assert "| `teachers[].name` | string | *required* |" in text
    assert "| `serve.canary_percent` | number, ≥ 0, ≤ 100 | `5` | Share of users" in text
    assert "## filters[] (kind: reference_match)" in text and "| `filters[].min_score` | number, ≥ 0, ≤ 1 | `1.0` |" in text


def test_the_generator_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "distill_ray.config.reference"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out == reference() and out.startswith("# Config reference\n")
