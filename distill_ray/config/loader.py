"""Load a pipeline config from YAML plus `-o key.path=value` overrides, with errors users can act on.

Every problem is reported at once, each naming the key path and, for keys that came from the YAML
file, the file and line. Overrides are parsed as YAML scalars (so `train.epochs=3` is an int,
`train.use_gpu=true` a bool, `prompts.source=[a.jsonl,b.jsonl]` a list) and then validated with the
same pydantic models as the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distill_ray.config.schema import SECRET_KEYS, PipelineConfig
from distill_ray.errors import BadInput

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config."""

    key: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file and self.line else (f"{self.file}: " if self.file else "")
        key = self.key or "(config)"
        return f"{where}{key}: {self.message}"


class ConfigError(BadInput):
    """A config (or its overrides) is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping key and sequence item."""


def _compose_lines(text: str) -> dict[Path_, int]:
    """Map each key path in a YAML document to its 1-based line."""
    node = yaml.compose(text, Loader=_LineLoader)
    lines: dict[Path_, int] = {}

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    if node is not None:
        walk(node, ())
    return lines


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Split `a.b.0.c=value` into a key path and a YAML-typed value.

    Raises:
        ConfigError: when the override is not of the form key.path=value.
    """
    if "=" not in text:
        raise ConfigError([Problem(key=text, message="an override must look like key.path=value")])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.(\w[\w-]*))*", key):
        raise ConfigError([Problem(key=key, message=f"'{key}' is not a key path like train.epochs or teachers.0.model")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the plain string, validation decides
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str | int], value: Any) -> None:
    """Set `value` at `parts` inside nested dicts/lists, creating dicts on the way."""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError([Problem(key=_dotted(parts[: depth + 1]), message="no such list item")])
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError([Problem(key=_dotted(parts[: depth + 1]), message="parent is not a mapping")])
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError([Problem(key=_dotted(parts), message="no such list item")])
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError([Problem(key=_dotted(parts), message="parent is not a mapping")])
        node[last] = value


def _dotted(parts: Path_ | list[str | int]) -> str:
    return ".".join(str(p) for p in parts)


def _problems_from(exc: ValidationError, lines: dict[Path_, int], file: str | None, overridden: set[str]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        # Drop pydantic's union tags (e.g. the filter kind) from the location shown to users.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _FILTER_KINDS and len(err["loc"]) > 2))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see jobs/configs/ for every key)"
        elif err["type"] == "missing":
            message = "required key is missing"
        if not loc:
            # A cross-field rule: its message starts with the key path it is about.
            match = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)*)", message)
            loc = tuple(match.group(1).split(".")) if match else ()
        key = _dotted(loc)
        line = None
        for depth in range(len(loc), 0, -1):  # the key, else its nearest parent present in the file
            if loc[:depth] in lines:
                line = lines[loc[:depth]]
                break
        source = "override" if key in overridden else file
        problems.append(Problem(key=key, message=message, file=source, line=None if source == "override" else line))
    return problems


_FILTER_KINDS = {"min_mean_logprob", "regex", "json_schema", "reference_match", "agreement", "python"}


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline config.

    Args:
        path: YAML file, or None for the built-in defaults.
        overrides: `key.path=value` strings, applied in order after the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem, each with key path and (for the file) line.
    """
    data: dict[str, Any] = {}
    lines: dict[Path_, int] = {}
    file = None
    if path is not None:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([Problem(key="", message="config file not found", file=file)]) from None
        except OSError as exc:
            raise ConfigError([Problem(key="", message=f"cannot read the config: {exc.strerror}", file=file)]) from exc
        try:
            loaded = yaml.safe_load(text)
            lines = _compose_lines(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            reason = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([Problem(key="", message=f"not valid YAML: {reason}", file=file, line=line)]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([Problem(key="", message="the top level must be a mapping of keys", file=file, line=1)])
        data = loaded
    problems: list[Problem] = _pop_literal_secrets(data, (), lines, file)
    overridden: set[str] = set()
    for text_override in overrides:
        try:
            parts, value = parse_override(text_override)
            if parts[0] not in data and parts[0] in PipelineConfig.model_fields and any(isinstance(p, int) for p in parts):
                # An item of a list the file leaves to its defaults (e.g. teachers.0.model): the default list.
                # Only then: a whole default section would hold every default as if the file had set it
                # (train.deepspeed.preset=zero3 next to the default zero_stage 2 would contradict it).
                data[parts[0]] = PipelineConfig().model_dump(mode="json", by_alias=True)[parts[0]]
            apply_override(data, parts, value)
            overridden.add(_dotted(parts))
        except ConfigError as exc:
            problems.extend(Problem(p.key, p.message, "override") for p in exc.problems)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, lines, file, overridden))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def _pop_literal_secrets(node: Any, path: Path_, lines: dict[Path_, int], file: str | None) -> list[Problem]:
    """Report (and drop, so that every other problem still shows) keys that hold a secret value."""
    problems = []
    if isinstance(node, dict):
        for key in list(node):
            if isinstance(key, str) and key.lower() in SECRET_KEYS:
                del node[key]
                problems.append(Problem(
                    key=_dotted(path + (key,)), file=file, line=lines.get(path + (key,)),
                    message=f"holds a secret: secrets never go in configs. Put it in an environment variable "
                    f"and name that variable in '{key}_env'",
                ))
            else:
                problems.extend(_pop_literal_secrets(node[key], path + (key,), lines, file))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            problems.extend(_pop_literal_secrets(item, path + (index,), lines, file))
    return problems


def is_pipeline_config(path: str | os.PathLike) -> bool:
    """Whether a YAML file looks like a distill-ray pipeline config (used to find every shipped config)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "workdir" in data and ("prompts" in data or "teachers" in data)
