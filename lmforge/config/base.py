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


# What changing a field does to a stage's result, declared on the field (``json_schema_extra=reuse(...)``)
# and read by :func:`lmforge.artifacts.fingerprint`; a field without a mark for a stage takes its section's.
INVALIDATES = "invalidates"  # the result, and any partial result (checkpoints), is outdated: start over
RESUMABLE = "resumable"  # the stage runs again, continuing from its checkpoints (train.steps: train on)
IRRELEVANT = "irrelevant"  # the result stays valid (how progress is shown, which device runs it)
REUSE_MARKS = (INVALIDATES, RESUMABLE, IRRELEVANT)


def reuse(top: tuple[str, ...] = (), added: bool = False, **stages: str) -> dict[str, Any]:
    """Field metadata: ``reuse(train=RESUMABLE)``; ``top`` names the stages whose fingerprint keys this
    field by its own name instead of under its section (the layout of fingerprints already on disk);
    ``added=True`` marks a field added after runs were written: left out of fingerprints while it holds its
    default, so those runs are still skipped and resumed."""
    bad = {s: m for s, m in stages.items() if m not in REUSE_MARKS}
    if bad:
        raise ValueError(f"reuse marks must be one of {REUSE_MARKS}, got {bad}")
    return {"reuse": stages, **({"reuse_top": list(top)} if top else {}), **({"reuse_added": True} if added else {})}
