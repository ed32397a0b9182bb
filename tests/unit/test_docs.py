"""The docs tell the truth about the CLI and the config: every `distill-ray` command written in
README.md, docs/ and the folder READMEs names a real verb and only real options (checked with the
CLI's own argparse parser), and every config key written as `section.key` exists in the schema."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from distill_ray.cli import build_parser
from distill_ray.config.schema import PipelineConfig
from tests.conftest import ROOT

SKIP_DIRS = {".venv", ".git", "node_modules", "runs", ".gpu", ".cache"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # an inline code span may wrap onto a second line
# A command starts a line or span (after an optional `$ ` prompt) or follows `&&`, `;`, `|` or `$(`, and
# its verb is a word: `kubectl -n distill-ray get ...` and the output line `distill-ray validate: ...` are not.
COMMAND = re.compile(r"(?:^(?:\$ )?|(?<=&& )|(?<=; )|(?<=\| )|(?<=\$\())distill-ray\s+[a-z][a-z-]*(?=\s|$)", re.M)
PLACEHOLDER = re.compile(r"<[^<>`]*>")  # <GCS port>, <student>: one word for the parser
SHELL_END = {"|", "||", "&&", ";", ")", "&"}
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "html", "txt", "sh", "csv", "parquet"}


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "SCALING.md", *sorted((ROOT / "docs").glob("*.md"))]
    for readme in sorted(ROOT.rglob("README.md")):
        parts = readme.relative_to(ROOT).parts
        if not SKIP_DIRS & set(parts) and readme not in files:
            files.append(readme)
    return [f for f in files if f.exists()]


def _code(text: str) -> tuple[list[str], list[str]]:
    """(lines of fenced blocks, inline code spans outside them)."""
    blocks = [line for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
    spans = [span.replace("\n", " ") for span in SPAN.findall(FENCE.sub("", text))]
    return blocks, spans


def commands_in(text: str) -> list[list[str]]:
    """Each `distill-ray ...` command written in a doc, as argv (after `distill-ray`), cut at a shell
    comment, pipe, `&&` or `;`."""
    blocks, spans = _code(text)
    found = []
    for piece in blocks + spans:
        piece = PLACEHOLDER.sub("X", piece)
        for match in COMMAND.finditer(piece):
            start = match.start() + match.group(0).index("distill-ray")
            lexer = shlex.shlex(piece[start:], posix=True, punctuation_chars="|&;()")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                tokens = list(lexer)
            except ValueError:  # an unbalanced quote in a span that quotes a part of a command
                tokens = piece[start:].split("#")[0].split()
            argv = []
            for token in tokens[1:]:
                if token in SHELL_END:
                    break
                argv.append(token)
            found.append(argv)
    return found


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if action.choices is not None and isinstance(action.choices, dict):
            return action.choices
    return {}


def command_problem(argv: list[str]) -> str | None:
    """Why `distill-ray <argv>` is not a command this CLI takes (None when it is)."""
    parser = build_parser()
    current, rest = parser, list(argv)
    while (subs := _subparsers(current)) and rest:
        if rest[0] not in subs:
            return f"no verb {rest[0]!r} (known: {', '.join(subs)})"
        current, rest = subs[rest[0]], rest[1:]
    if subs and not rest:
        return None  # `distill-ray teacher` or `distill-ray jobs` named in prose: the verb exists
    known = {option for option, action in current._option_string_actions.items()  # hidden ones are not documented
             if action.help != argparse.SUPPRESS}
    for token in rest:
        if token.startswith("-") and not re.fullmatch(r"-\d.*", token):
            option = token.split("=", 1)[0]
            if option not in known:  # exact: argparse itself would accept an abbreviation
                return f"{' '.join(argv[:1])}: no option {option} (known: {', '.join(sorted(known))})"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
        if exc.code == 0 or "the following arguments are required" in message:
            return None  # `--help`, or a command written without its CONFIG in prose
        return message
    for override in getattr(args, "overrides", []):
        key = override.split("=", 1)[0]
        if key not in ("key.path", "KEY.PATH") and not schema_has(key):
            return f"-o {key}: no such config key"
    return None


# --- the schema ---------------------------------------------------------------------------------------


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (through Optional, list, Annotated, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is dict:
        return []
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_models(arg))
    return out


def _is_open_mapping(annotation) -> bool:
    """dict[...] somewhere in the annotation: any key below is the user's."""
    if typing.get_origin(annotation) is dict or annotation is dict:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list,
                                                                                   typing.Annotated):
        return any(_is_open_mapping(a) for a in typing.get_args(annotation))
    return False


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if typing.get_origin(annotation) is not dict)


def schema_has(key: str) -> bool:
    """Whether `key` (dots between levels; a list's items as `0`, `[]` or `name[]`) is a config key."""
    parts = [p for p in re.split(r"\.|\[\]", key) if p]
    models: list[type[BaseModel]] = [PipelineConfig]
    annotation = None
    for i, part in enumerate(parts):
        if annotation is not None and _is_list(annotation) and part.isdigit():
            continue  # an index into a list of models: teachers.0.model
        matches = [(name, field) for model in models for name, field in model.model_fields.items()
                   if part in (name, field.alias)]
        if not matches:
            return False
        annotation = matches[0][1].annotation
        if _is_open_mapping(annotation) and not _models(annotation):
            return True  # students[].train: {...}, a stage's guardrails: any key below is checked at load
        models = [m for _, field in matches for m in _models(field.annotation)]
        if not models and i < len(parts) - 1 and not (parts[i + 1].isdigit() and _is_list(annotation)):
            return False
    return True


SECTIONS = sorted(name for name, field in PipelineConfig.model_fields.items() if _models(field.annotation))
KEY = re.compile(rf"^(?:-o\s+)?((?:{'|'.join(SECTIONS)})(?:\[\])?(?:\.(?:[a-z_][a-z0-9_]*|\d+)(?:\[\])?)+)"
                 r"(?:\s*[:=].*)?$")


def keys_in(text: str) -> list[str]:
    """Config keys written as inline code (`train.max_steps`, `serve.mode: canary`, `-o prompts.size=500`)."""
    _, spans = _code(text)
    keys = []
    for span in spans:
        match = KEY.match(span.strip())
        if match and match.group(1).rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            keys.append(match.group(1))
    return keys


# --- the tests -----------------------------------------------------------------------------------------

DOCS = doc_files()


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_docs_are_found():
    names = {_id(p) for p in DOCS}
    assert {"README.md", "docs/cli.md", "docs/serving.md", "monitoring/README.md", "cluster/README.md"} <= names
    assert len(commands_in((ROOT / "README.md").read_text())) >= 15  # the workflow table alone
    assert sum(len(keys_in(p.read_text())) for p in DOCS) >= 100


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_every_command_is_one_the_cli_takes(path):
    bad = [f"distill-ray {' '.join(argv)}: {problem}" for argv in commands_in(path.read_text())
           if (problem := command_problem(argv))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_every_config_key_is_in_the_schema(path):
    bad = sorted({key for key in keys_in(path.read_text()) if not schema_has(key)})
    assert not bad, f"{_id(path)} names config keys the schema does not have: {', '.join(bad)}"


def test_the_checks_catch_a_made_up_verb_option_or_key():
    text = ("Run `distill-ray train CONFIG --fast` or `distill-ray trian CONFIG`, then\n"
            "```\ndistill-ray rollout CONFIG --mode canary --percent 25 --dry   # a comment\n"
            "distill-ray rollout CONFIG --mode half\n"
            "distill-ray run CONFIG -o train.max_stepz=3\n```\n"
            "Set `train.max_stepz` and `serve.guardrails.min_request`, not `train.max_steps`.\n")
    problems = {" ".join(argv): command_problem(argv) for argv in commands_in(text)}
    assert len(problems) == 5 and all(problems.values()), problems
    assert "no option --fast" in problems["train CONFIG --fast"]
    assert "no verb 'trian'" in problems["trian CONFIG"]
    assert "no option --dry" in problems["rollout CONFIG --mode canary --percent 25 --dry"]
    assert "invalid choice: 'half'" in problems["rollout CONFIG --mode half"]
    assert "train.max_stepz" in problems["run CONFIG -o train.max_stepz=3"]
    assert [k for k in keys_in(text) if not schema_has(k)] == ["train.max_stepz", "serve.guardrails.min_request"]
    assert command_problem(["jobs", "logs", "ID", "--follow"]) is None
    assert command_problem(["teacher", "serve", "--port", "8100"]) is None
    assert command_problem(["rollout", "--plan", "resume"]) is None  # CONFIG left out in prose
    for key in ("teachers.0.model", "teachers[].engine", "students[].train", "serve.engine.num_gpus",
                "serve.rollout_plan", "train.deepspeed.zero_stage", "eval.engine.num_gpus"):
        assert schema_has(key), key


def test_the_readme_config_is_one_the_schema_takes():
    import yaml

    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    assert blocks, "README.md has no yaml config"
    config = PipelineConfig.model_validate(yaml.safe_load(blocks[0]))
    assert config.teachers[0].api_key_env == "OPENAI_API_KEY" and config.students[0].name == "small"
