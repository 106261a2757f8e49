"""The base of every config section: unknown keys are errors, one string may stand for a list."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _one_as_list(cls, data: Any) -> Any:
        """``--data.train=book.txt`` means ``[book.txt]``: a single string is a one-item list."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if field.annotation == list[str] and isinstance(data.get(name), str):
                    data = {**data, name: [data[name]]}
        return data
