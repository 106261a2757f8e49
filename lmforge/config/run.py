"""The whole run's config, and how it is loaded, overridden, saved and explained.

Values come, in order of precedence, from the class defaults, a YAML recipe and
``section.key=value`` overrides; the resolved config is saved as commented YAML.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from lmforge.config.base import INVALIDATES, ConfigError, Section, reuse
from lmforge.config.cleaning import CleanConfig, CollectConfig
from lmforge.config.finetune import FinetuneConfig
from lmforge.config.sections import (
    CompareConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    PlanConfig,
    SampleConfig,
    ServeConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
)


class YAMLLoader(yaml.SafeLoader):
    """YAML as JSON and YAML 1.2 read numbers: PyYAML follows YAML 1.1, where ``1e-06`` (no dot) is a string.

    It matters for values copied from a Hugging Face ``config.json`` (``rms_norm_eps: 1e-06``) into
    ``model.hf_config``, a mapping whose fields no type check turns back into numbers."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YAMLLoader)  # a SafeLoader: no object tags


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.\-]+$", description="run name: outputs go to runs_dir/name")
    runs_dir: str = Field("runs", description="folder holding all runs")
    seed: int = Field(1337, description="global seed: data split, init, batch order, dropout",
                      json_schema_extra=reuse(docs=INVALIDATES, train=INVALIDATES, finetune=INVALIDATES, dpo=INVALIDATES,
                                              bakeoff=INVALIDATES))
    data: DataConfig = Field(default_factory=DataConfig, description="where the text comes from",
                              json_schema_extra=reuse(docs=INVALIDATES, bakeoff=INVALIDATES))
    collect: CollectConfig = Field(default_factory=CollectConfig, description=(
        "collect stage: read files, datasets, databases and web pages into document shards"),
        json_schema_extra=reuse(collect=INVALIDATES, bakeoff=INVALIDATES))
    clean: CleanConfig = Field(default_factory=CleanConfig, description=(
        "clean stage: repair, filter, scrub, deduplicate and decontaminate the collected documents"),
        json_schema_extra=reuse(clean=INVALIDATES, bakeoff=INVALIDATES))
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="tokenizer training",
                                        json_schema_extra=reuse(tokenizer=INVALIDATES, bakeoff=INVALIDATES))
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture and size",
                                json_schema_extra=reuse(train=INVALIDATES, bakeoff=INVALIDATES))
    train: TrainConfig = Field(default_factory=TrainConfig, description="pre-training",
                                json_schema_extra=reuse(train=INVALIDATES, bakeoff=INVALIDATES))
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation on held-out text",
                              json_schema_extra=reuse(eval=INVALIDATES))
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description=(
        "fine-tuning a pretrained model on text or conversations (lmforge finetune; the finetune stage)"),
        json_schema_extra=reuse(finetune=INVALIDATES, dpo=INVALIDATES))
    sample: SampleConfig = Field(default_factory=SampleConfig, description="text generation",
                                  json_schema_extra=reuse(sample=INVALIDATES))
    compare: CompareConfig = Field(default_factory=CompareConfig, description="architecture bake-off (compare-archs)")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="hyperparameter search (lmforge sweep)")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="the recipe for a time budget (lmforge plan)")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the OpenAI-compatible server (lmforge serve)")
    export: ExportConfig = Field(default_factory=ExportConfig, description="model export (lmforge export)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# ---------------------------------------------------------------------- loading
def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.lr=1e-3'`` -> ``('train.lr', 0.001)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("none", "null"):
        value = None
    return key, value


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, [key for key, _, _ in field_help()], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown config key '{loc}'{hint}")
        elif e["type"] == "value_error":
            lines.append(e["msg"].removeprefix("Value error, "))
        elif loc:
            got = e.get("input")
            lines.append(f"config key '{loc}': {e['msg']} (got {got!r})")
        else:
            lines.append(e["msg"].removeprefix("Value error, "))
    return f"{source}: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a YAML file and ``key=value`` overrides."""
    tree: dict = dict(base or {})
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = _merge(tree, loaded)
        source = str(p)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, source)) from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, every key commented with its description."""
    return _yaml_lines(cfg, 0)


def _yaml_lines(cfg: BaseModel, indent: int) -> str:
    out = []
    pad = "  " * indent
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if field.description:
            out.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:")
            out.append(_yaml_lines(value, indent + 1))
        else:
            if isinstance(value, list):  # e.g. collect.sources: sections inside a list are written as mappings
                value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()
            out.append(pad + dumped.removeprefix("{").removesuffix("}"))
    return "\n".join(out)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg) + "\n", encoding="utf-8")


def field_help(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, description)`` for every leaf field: the CLI's --help."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_help(ann, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory else field.default
            rows.append((prefix + name, repr(default), field.description or ""))
    return rows
