"""Typed configuration: one section per stage, YAML recipes, dotted overrides.

A run is described by one :class:`RunConfig`. Each pipeline stage reads its own
section (``data``, ``collect``, ``clean``, ``tokenizer``, ``model``, ``train``,
``eval``, ``sample``, ...). Values come, in order of precedence, from the class
defaults, a YAML recipe (``--config configs/demo.yaml``) and
``--section.key=value`` overrides::

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-3", "model.arch=lstm"])

Every field carries a description: it is the ``--help`` text and the comment
written beside the resolved ``config.yaml`` of each run. Unknown keys and values
out of range raise :class:`ConfigError` naming the key. A field's ``reuse`` mark
(``json_schema_extra=reuse(train=RESUMABLE)``, :func:`lmforge.config.base.reuse`)
says what changing it does to each pipeline stage's result: invalidates it, is
resumable, or is irrelevant; a field without one takes its section's mark, and
:mod:`lmforge.artifacts` reads them to decide whether a stage can be skipped.

- ``base``: ConfigError and the Section base class
- ``sections``: the spine's sections and those of the sweep, compare, serve and export verbs
- ``cleaning``: the collect and clean sections
- ``finetune``: the finetune section and its LoRA options
- ``run``: RunConfig, loading, overrides, YAML and help text
"""

from lmforge.config.base import (
    ConfigError,
    Section,
)
from lmforge.config.cleaning import (
    CleanConfig,
    CollectConfig,
    DedupConfig,
    LanguageConfig,
    LinesConfig,
    NormalizeConfig,
    PIIConfig,
    QualityConfig,
    SourceConfig,
    WebConfig,
)
from lmforge.config.finetune import FinetuneConfig, LoraConfig, PreferenceConfig
from lmforge.config.run import (
    RunConfig,
    field_help,
    load_config,
    parse_override,
    save_config,
    to_yaml,
)
from lmforge.config.sections import (
    ARCHS,
    SCRATCH_ARCHS,
    CNNConfig,
    CompareConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    PlanConfig,
    RNNConfig,
    SampleConfig,
    ServeConfig,
    SlurmConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
    TransformerConfig,
)

__all__ = [
    "ARCHS",
    "SCRATCH_ARCHS",
    "CNNConfig",
    "CleanConfig",
    "CollectConfig",
    "CompareConfig",
    "ConfigError",
    "DataConfig",
    "DedupConfig",
    "SlurmConfig",
    "EvalConfig",
    "FinetuneConfig",
    "ExportConfig",
    "LanguageConfig",
    "LinesConfig",
    "LoraConfig",
    "PreferenceConfig",
    "ModelConfig",
    "PlanConfig",
    "NormalizeConfig",
    "PIIConfig",
    "QualityConfig",
    "RNNConfig",
    "RunConfig",
    "SampleConfig",
    "Section",
    "ServeConfig",
    "SourceConfig",
    "SweepConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TransformerConfig",
    "WebConfig",
    "field_help",
    "load_config",
    "parse_override",
    "save_config",
    "to_yaml",
]
