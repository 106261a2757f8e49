"""Typed configuration: one section per stage, YAML recipes, dotted overrides.

A run is described by one :class:`RunConfig`. Each pipeline stage reads its own
section (``data``, ``tokenizer``, ``model``, ``train``, ``eval``, ``sample``).
Values come, in order of precedence, from the class defaults, a YAML recipe
(``--config configs/demo.yaml``) and ``--section.key=value`` overrides::

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-3", "model.arch=lstm"])

Every field carries a description: it is the ``--help`` text and the comment
written beside the resolved ``config.yaml`` of each run. Unknown keys and values
out of range raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


# --------------------------------------------------------------------------- data
class DataConfig(Section):
    train: list[str] = Field(default_factory=list, description=(
        "training text: files or folders of UTF-8 text (.txt, .md, .jsonl with a 'text' field, "
        "optionally .gz/.xz); empty = the embedded Shakespeare corpus"))
    val: list[str] = Field(default_factory=list, description=(
        "validation text given explicitly (same formats); empty = hold out documents of the training text"))
    split: Literal["docs", "tail"] = Field("docs", description=(
        "how validation is held out when data.val is empty: 'docs' = whole documents (works) chosen by "
        "seed; 'tail' = the last val_fraction of the concatenated text, split by characters (nanoGPT style)"))
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description=(
        "share of the text held out for validation (of documents for split=docs, of characters for tail)"))
    val_docs: list[str] = Field(default_factory=list, description=(
        "document ids to hold out (e.g. [hamlet, sonnets]); overrides val_fraction for split=docs"))
    shard_tokens: int = Field(100_000_000, ge=1024, description=(
        "tokens per packed shard file; a shard closes at the first document boundary past it"))


# ---------------------------------------------------------------------- tokenizer
class TokenizerConfig(Section):
    kind: Literal["bpe", "char"] = Field("bpe", description=(
        "'bpe' = byte-level BPE (round-trips any UTF-8); 'char' = one token per character seen in training, "
        "unseen characters fall back to UTF-8 bytes"))
    vocab_size: int = Field(2048, ge=64, le=1_000_000, description=(
        "BPE vocabulary size including special tokens (ignored for kind=char)"))
    path: str | None = Field(None, description=(
        "use this existing tokenizer.json (or folder holding one) instead of training a new one"))
    min_frequency: int = Field(2, ge=1, description="BPE: minimum count for a merge to be learned")


# -------------------------------------------------------------------------- model
class TransformerConfig(Section):
    n_heads: int = Field(4, ge=1, description="attention heads")
    n_kv_heads: int | None = Field(None, ge=1, description=(
        "key/value heads for grouped-query attention; None = n_heads (must divide n_heads)"))
    ffn_hidden: int | None = Field(None, ge=1, description=(
        "SwiGLU hidden width; None = 8/3 * d_model rounded up to a multiple of 32 (Llama's rule)"))
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys (not Llama-compatible; export refuses)")


class RNNConfig(Section):
    hidden: int | None = Field(None, ge=1, description="recurrent hidden width; None = d_model")
    embed_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input embeddings")


class CNNConfig(Section):
    kernel_size: int = Field(4, ge=1, description="causal convolution width in tokens")
    dilation_growth: int = Field(1, ge=1, description=(
        "dilation of layer i is growth**(i % dilation_cycle); 1 = no dilation"))
    dilation_cycle: int = Field(4, ge=1, description="layers after which the dilation pattern repeats")
    expansion: int = Field(2, ge=1, description="gated linear unit width = expansion * d_model")


class ModelConfig(Section):
    arch: Literal["transformer", "lstm", "gru", "cnn"] = Field("transformer", description=(
        "architecture from the model registry"))
    context: int = Field(256, ge=2, le=1_048_576, description="sequence length in tokens (training and decoding window)")
    d_model: int = Field(192, ge=8, description="embedding / residual width")
    n_layers: int = Field(4, ge=1, description="number of blocks (layers)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability inside the model")
    tie_embeddings: bool = Field(True, description="share the input embedding and output projection weights")
    init_std: float = Field(0.02, gt=0, description="standard deviation of the normal weight init")
    vocab_size: int = Field(0, ge=0, description="vocabulary size; 0 = take it from the tokenizer")
    transformer: TransformerConfig = Field(default_factory=TransformerConfig, description="Transformer options")
    rnn: RNNConfig = Field(default_factory=RNNConfig, description="LSTM / GRU options")
    cnn: CNNConfig = Field(default_factory=CNNConfig, description="gated CNN options")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        t = self.transformer
        if self.arch == "transformer":
            if self.d_model % t.n_heads:
                raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                                 f"model.transformer.n_heads ({t.n_heads})")
            if (self.d_model // t.n_heads) % 2:
                raise ValueError("model.d_model / model.transformer.n_heads must be even for rotary embeddings")
            if t.n_kv_heads is not None and t.n_heads % t.n_kv_heads:
                raise ValueError(f"model.transformer.n_kv_heads ({t.n_kv_heads}) must divide "
                                 f"model.transformer.n_heads ({t.n_heads})")
        if self.arch == "cnn" and self.cnn.kernel_size > self.context:
            raise ValueError(f"model.cnn.kernel_size ({self.cnn.kernel_size}) is wider than "
                             f"model.context ({self.context})")
        return self


# -------------------------------------------------------------------------- train
class TrainConfig(Section):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    max_seconds: float | None = Field(None, gt=0, description=(
        "stop after this much training time even if steps remain (None = no time limit)"))
    stop_at: int | None = Field(None, ge=1, description=(
        "end this invocation after this step with a checkpoint, as if interrupted; the LR schedule still "
        "spans train.steps, and a later run resumes from there"))
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final learning rate as a fraction of lr")
    schedule: Literal["cosine", "wsd", "constant", "linear"] = Field("cosine", description=(
        "after warmup: cosine decay, warmup-stable-decay, constant, or linear decay"))
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps spent decaying at the end")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (matrices only; not norms, biases)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm to this (0 = off)")
    eval_every: int = Field(100, ge=0, description="estimate validation loss every N steps (0 = only at the end)")
    eval_batches: int = Field(8, ge=1, description="micro-batches per in-training validation estimate")
    log_every: int = Field(10, ge=1, description="write a metrics line every N steps")
    ckpt_every: int = Field(250, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk (older ones are deleted)")
    resume: bool = Field(True, description="continue from the newest valid checkpoint of the run if one exists")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "autocast dtype; auto = bfloat16 on CUDA that supports it, float32 on CPU (bf16 is ~100x slower there)"))
    compile: bool = Field(False, description="torch.compile the model (slow to start; pays off on GPUs)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    tensorboard: bool = Field(True, description="also write TensorBoard events (needs the tensorboard package)")
    progress: bool = Field(True, description="show a progress bar")


# --------------------------------------------------------------------------- eval
class EvalConfig(Section):
    text: list[str] = Field(default_factory=list, description=(
        "files or folders to evaluate with `lmforge eval` (empty = the run's validation text)"))
    stride: int | None = Field(None, ge=1, description=(
        "sliding-window stride in tokens; None = context (non-overlapping windows); smaller = more context per token"))
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    max_tokens: int | None = Field(None, ge=1, description="evaluate at most this many tokens (None = all)")


# ------------------------------------------------------------------------- sample
class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "To be, or not to be", "KING HENRY:"],
                               description="prompts to continue")
    max_new_tokens: int = Field(200, ge=1, description="tokens to generate per prompt")
    temperature: float = Field(0.8, ge=0.0, description="sampling temperature (0 = greedy)")
    top_k: int | None = Field(50, ge=1, description="keep the k most likely tokens (None = all)")
    top_p: float | None = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass (None = off)")
    stop: list[str] = Field(default_factory=list, description="stop when any of these strings is produced")
    seed: int = Field(1234, description="sampling seed")


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.\-]+$", description="run name: outputs go to runs_dir/name")
    runs_dir: str = Field("runs", description="folder holding all runs")
    seed: int = Field(1337, description="global seed: data split, init, batch order, dropout")
    data: DataConfig = Field(default_factory=DataConfig, description="where the text comes from")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="tokenizer training")
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture and size")
    train: TrainConfig = Field(default_factory=TrainConfig, description="pre-training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation on held-out text")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="text generation")

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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("none", "null"):
        value = None
    return key, value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, _known_keys(RunConfig), n=1)
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
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
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
