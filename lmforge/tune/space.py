"""Search spaces for ``lmforge sweep``: a YAML mapping from any config field to a distribution.

::

    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}     # log-uniform
    train.warmup_steps: {type: int, low: 0, high: 200, step: 50}       # 0, 50, ..., 200
    train.weight_decay: {type: float, low: 0.0, high: 0.2}             # uniform
    train.schedule: {type: categorical, choices: [cosine, wsd]}
    model.d_model: {type: categorical, choices: [96, 128, 192]}

Keys are the dotted config keys of ``lmforge <verb> --help``. The space is checked before any trial
runs: an unknown field, a malformed distribution, or a bound or choice the config itself would reject
(``train.lr: {low: 0, ...}``) raises :class:`~lmforge.config.ConfigError` naming the file and field.
Combinations can still be invalid (``model.d_model`` not divisible by the heads); such a trial fails
with the config's message and the sweep goes on.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import ConfigError, RunConfig, field_help, load_config

TYPES = ("float", "int", "categorical")
OPTIONS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
           "categorical": {"choices"}}
# Fields the sweep sets itself for every trial.
RESERVED = ("name", "runs_dir", "sweep.")


@dataclass
class Param:
    """One searched config field and its distribution."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial) -> Any:
        """Draw a value from an Optuna trial."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, self.choices)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this distribution (so the baseline trial may use it)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        step = self.step or (1 if self.type == "int" else None)
        return step is None or abs((value - self.low) / step - round((value - self.low) / step)) < 1e-9

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.key} in {self.choices}"
        extra = (", log" if self.log else "") + (f", step {self.step}" if self.step else "")
        return f"{self.key} {self.type} [{self.low}, {self.high}{extra}]"


def with_values(base: RunConfig, values: dict[str, Any], **top: Any) -> RunConfig:
    """``base`` with dotted ``values`` (and top-level fields ``top``) set, validated like a config file."""
    tree = base.model_dump()
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    tree.update(top)
    return load_config(base=tree)


def load_space(path: str | Path, base: RunConfig) -> list[Param]:
    """Read and check a search space file against ``base`` (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep.space: search space file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{p}: the search space must map config fields to distributions, e.g. "
                          "'train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}'")
    known = [k for k, _, _ in field_help()]
    params = []
    for key, spec in tree.items():
        key = str(key)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{p}: unknown config field '{key}' in the search space{hint}")
        if key in RESERVED[:2] or key.startswith(RESERVED[2]):
            raise ConfigError(f"{p}: '{key}' is set by the sweep itself and cannot be searched")
        params.append(_param(p, key, spec))
    for param in params:  # every bound and choice must be a value the config accepts on its own
        for value in param.choices or [param.low, param.high]:
            try:
                with_values(base, {param.key: value})
            except ConfigError as e:
                reason = str(e).removeprefix("config: ")
                raise ConfigError(f"{p}: {param.key}: the value {value!r} is not accepted: {reason}") from None
    return params


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"{path}: {key}"
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"{where}: give a mapping with 'type' one of {', '.join(TYPES)} (got {spec!r})")
    kind = spec["type"]
    unknown = sorted(set(spec) - OPTIONS[kind] - {"type"})
    if unknown:
        raise ConfigError(f"{where}: unknown option '{unknown[0]}' for type {kind} "
                          f"(allowed: {', '.join(sorted(OPTIONS[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}: choices must be plain values (numbers, strings, booleans, null)")
        return Param(key, kind, choices=choices)
    number = int if kind == "int" else (int, float)
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be {'an integer' if kind == 'int' else 'a number'} "
                              f"(got {value!r})")
    if not low < high:
        raise ConfigError(f"{where}: 'low' ({low}) must be below 'high' ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false (got {log!r})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs 'low' > 0 (got {low})")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0 or log):
        raise ConfigError(f"{where}: 'step' must be a positive {'integer' if kind == 'int' else 'number'} "
                          f"and cannot go with log: true (got {step!r})")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def baseline_values(base: RunConfig, params: list[Param]) -> dict[str, Any]:
    """The base config's own value of each searched field that lies inside its distribution."""
    out = {}
    for param in params:
        node: Any = base
        for part in param.key.split("."):
            node = getattr(node, part)
        if param.contains(node):
            out[param.key] = node
    return out
