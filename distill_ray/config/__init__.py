"""The pipeline config: schema, loading with overrides, and printing with secrets masked."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from distill_ray.config.loader import ConfigError, Problem, is_pipeline_config, load_config
from distill_ray.config.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "Problem", "is_pipeline_config", "load_config", "resolved_yaml", "masked"]

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^@/\s]+)@", re.I)
_SECRET_QUERY = re.compile(r"(?P<key>(?:api[_-]?key|key|token|secret|signature|password)=)[^&\s]+", re.I)


def masked(value: Any) -> Any:
    """Return `value` with credentials in URLs and secret-looking query parameters replaced by ***."""
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, str):
        value = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
        return _SECRET_QUERY.sub(r"\g<key>***", value)
    return value


def resolved_yaml(config: PipelineConfig) -> str:
    """The config as YAML with every default filled in and secrets masked.

    Environment variables named by `*_env` keys are shown by name with whether they are set,
    never with their value.
    """
    data = masked(config.model_dump(mode="json", by_alias=True))

    def note_env(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k.endswith("_env") and isinstance(v, str):
                    out[k] = f"{v}  # {'set' if os.environ.get(v) else 'NOT set'} in this environment"
                else:
                    out[k] = note_env(v)
            return out
        if isinstance(node, list):
            return [note_env(v) for v in node]
        return node

    text = yaml.safe_dump(note_env(data), sort_keys=False, allow_unicode=True, width=100)
    # safe_dump quotes the inline comment into the string; turn it back into a YAML comment.
    return re.sub(r"'([A-Za-z_][A-Za-z0-9_]*)  # ([^']*)'", r"\1  # \2", text)
