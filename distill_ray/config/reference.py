"""The config reference (docs/config.md), written from the schema: every section and key with its
type, default and description.

    python -m distill_ray.config.reference > docs/config.md

tests/unit/test_config_reference.py fails when docs/config.md is not what this writes.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from distill_ray.config.schema import PipelineConfig

INTRO = """# Config reference

<!-- Written by `python -m distill_ray.config.reference > docs/config.md` from the schema
(distill_ray/config/): change a description there, not here. -->

Every `distill-ray` verb reads one YAML file of these sections. Unknown keys are errors, every key
has a default except where it says *required*, and any key can be set on the command line with
`-o section.key=value` (`-o teachers.0.model=gpt-4o-mini`). `distill-ray validate CONFIG` checks a
file and prints it with every default filled in (secrets masked). The items of a list of sections are
written `teachers[]`; a section's type is `section`, described under its own heading.
"""

_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", Any: "any"}
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "at least"))


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (through Optional, list, Annotated and unions; not dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is dict:
        return []
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if typing.get_origin(annotation) is not dict)


def _kind(model: type[BaseModel]) -> str | None:
    """The `kind` of a section that is one member of a union (a filter), else None."""
    field = model.model_fields.get("kind")
    return typing.get_args(field.annotation)[0] if field and typing.get_origin(field.annotation) is Literal else None


def type_text(annotation: Any) -> str:
    """A field's type in words: `'a' or 'b'`, `list of string`, `number or null`, `section`."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is typing.Annotated:
        return type_text(typing.get_args(annotation)[0])
    if origin is Literal:
        return " or ".join(f"'{a}'" if isinstance(a, str) else json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(m) for m in models_in(annotation)]
        if len(kinds) > 1:  # a union of sections told apart by `kind`
            return "section of kind " + " or ".join(f"'{k}'" for k in kinds)
        return " or ".join(type_text(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return "list of " + (type_text(item).replace("section", "sections", 1) if models_in(item) else type_text(item))
    if origin is dict:
        key, value = typing.get_args(annotation)
        return "mapping" if value is Any else f"mapping of {type_text(key)} to {type_text(value)}"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for attr, word in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value:g}")
    return ", ".join(out)


def default_text(field: FieldInfo) -> str:
    """A field's default as it would be written in YAML; *required* when it has none."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        return "[" + ", ".join(f"`{getattr(v, 'name', type(v).__name__)}`" for v in value) + "]"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def sections(model: type[BaseModel] = PipelineConfig, path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(key path, model) of the root and every section below it, depth first in field order; a list's
    items are `key[]`, each member of a union of sections comes once."""
    yield path, model
    for name, field in model.model_fields.items():
        key = field.alias or name
        below = f"{path}.{key}" if path else key
        if _is_list(field.annotation):
            below += "[]"
        for sub in models_in(field.annotation):
            yield from sections(sub, below)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    """The whole of docs/config.md."""
    out = [INTRO]
    for path, model in sections():
        title = path or "Top level"
        if kind := _kind(model):
            title += f" (kind: {kind})"
        out.append(f"## {title}\n")
        doc = model.__dict__.get("__doc__")
        if doc:
            out.append(_cell(inspect.cleandoc(doc)) + "\n")
        out.append("| key | type | default | description |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            key = field.alias or name
            full = f"{path}.{key}" if path else key
            kind = type_text(field.annotation)
            if bounds := _bounds(field):
                kind += f", {bounds}"
            out.append(f"| `{full}` | {_cell(kind)} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference())
