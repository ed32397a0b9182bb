"""What every config section shares: strict parsing, the name pattern, and the refusal of literal secrets."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
# Keys that must never hold a secret value: the config names an environment variable instead.
SECRET_KEYS = ("api_key", "token", "password", "secret", "auth_token", "aws_secret_access_key")


class Strict(BaseModel):
    """Base of every config section: unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key.lower() in SECRET_KEYS:
                    raise ValueError(
                        f"'{key}' holds a secret: secrets never go in configs. Put it in an environment "
                        f"variable and name that variable in '{key}_env'"
                    )
        return data


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


Regex = Annotated[str, AfterValidator(_compiles)]  # a Python regular expression, refused unless it compiles
