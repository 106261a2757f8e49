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
        "training text: files, folders or globs (.txt .md .html .epub .jsonl .csv .parquet, optionally "
        ".gz/.xz/.bz2/.zst), read by the collect stage with collect.sources; both empty = the embedded "
        "Shakespeare corpus"))
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
    bptt: int | None = Field(None, ge=1, description=(
        "truncated backpropagation through time: in training, gradients flow back at most this many tokens "
        "(the hidden state is carried forward but detached every bptt tokens); None = the whole sequence "
        "(model.context). The forward values, and so evaluation and decoding, do not change"))


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
    d_model: int = Field(192, ge=8, description="embedding / residual width (replaced when model.param_budget is set)")
    param_budget: int | None = Field(None, ge=1, description=(
        "size the model by its parameter count instead: d_model (and the RNN width) becomes the multiple of 8 "
        "whose total parameter count, embeddings included, is closest to this; None = use d_model"))
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
            # With a parameter budget the width is chosen later, as a multiple of 2 * n_heads.
            if self.d_model % t.n_heads and self.param_budget is None:
                raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                                 f"model.transformer.n_heads ({t.n_heads})")
            if (self.d_model // t.n_heads) % 2 and self.param_budget is None:
                raise ValueError("model.d_model / model.transformer.n_heads must be even for rotary embeddings")
            if t.n_kv_heads is not None and t.n_heads % t.n_kv_heads:
                raise ValueError(f"model.transformer.n_kv_heads ({t.n_kv_heads}) must divide "
                                 f"model.transformer.n_heads ({t.n_heads})")
        if self.arch == "cnn" and self.cnn.kernel_size > self.context:
            raise ValueError(f"model.cnn.kernel_size ({self.cnn.kernel_size}) is wider than "
                             f"model.context ({self.context})")
        if self.arch in ("lstm", "gru"):
            if self.rnn.bptt is not None and self.rnn.bptt > self.context:
                raise ValueError(f"model.rnn.bptt ({self.rnn.bptt}) is longer than model.context ({self.context}); "
                                 f"gradients cannot flow further back than one training sequence")
            if self.rnn.hidden is not None and self.param_budget is not None:
                raise ValueError(f"model.rnn.hidden ({self.rnn.hidden}) and model.param_budget "
                                 f"({self.param_budget}) both fix the width; set only one of them")
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
    early_stop_patience: int = Field(0, ge=0, description=(
        "stop when the validation loss has not improved by more than early_stop_min_delta for this many "
        "evaluations in a row (0 = never stop early)"))
    early_stop_min_delta: float = Field(0.0, ge=0.0, description=(
        "smallest drop of the validation loss (nats/token) that counts as an improvement for early stopping"))
    tasks_every: int = Field(0, ge=0, description="also run the eval.tasks every N steps during training (0 = never)")


# --------------------------------------------------------------------------- eval
class EvalConfig(Section):
    text: list[str] = Field(default_factory=list, description=(
        "files or folders to evaluate with `lmforge eval` (empty = the run's validation text)"))
    stride: int | None = Field(None, ge=1, description=(
        "sliding-window stride in tokens; None = context (non-overlapping windows); smaller = more context per token"))
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    max_tokens: int | None = Field(None, ge=1, description="evaluate at most this many tokens (None = all)")
    tasks: list[str] = Field(default_factory=list, description=(
        "evaluation tasks the eval stage runs: names of shipped tasks (speaker, minimal_pairs, cloze) "
        "or task files (.yaml spec or .jsonl items); see lmforge/eval/tasks.py"))


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


# -------------------------------------------------------------------------- sweep
class SweepConfig(Section):
    space: str | None = Field(None, description=(
        "search space YAML (--space FILE): config field -> {type: float|int|categorical, low, high, log, step, "
        "choices}; see docs/tuning.md"))
    trials: int = Field(20, ge=1, description=(
        "trial budget: stop when this many trials have finished (completed or pruned), earlier sessions included"))
    timeout: float | None = Field(None, gt=0, description=(
        "time budget of this session in seconds (None = none); the trial running at the deadline finishes"))
    metric: Literal["val_bpb", "val_loss"] = Field("val_bpb", description=(
        "what the sweep minimizes: the eval stage's validation bits per byte (comparable across tokenizers) "
        "or loss; pruning compares the in-training estimates of the same quantity"))
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: tree-structured Parzen or random")
    pruner: Literal["median", "halving"] | None = Field("median", description=(
        "stop unpromising trials at a validation estimate: median rule or successive halving (None = never)"))
    startup_trials: int = Field(5, ge=0, description=(
        "trials that run unpruned before the median pruner acts, and that TPE samples at random"))
    warmup_steps: int = Field(0, ge=0, description="no pruning before this training step (median pruner)")
    baseline: bool = Field(True, description=(
        "make the first trial the base config's own values (where they lie inside the space)"))
    storage: str | None = Field(None, description=(
        "Optuna storage URL; None = sqlite:///<runs_dir>/<name>/sweep.db, so a rerun resumes the sweep"))


# ------------------------------------------------------------------------ compare
class CompareConfig(Section):
    archs: list[str] = Field(default_factory=lambda: ["transformer", "lstm", "gru", "cnn"], min_length=1,
                             description="architectures `lmforge compare-archs` trains, each under runs_dir/NAME-ARCH")
    budget_seconds: float = Field(300.0, gt=0, description=(
        "training time per architecture in seconds (--budget-seconds); evaluation and checkpoints do not count"))
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "per-architecture config sections laid over this config, e.g. "
        "{lstm: {model: {n_layers: 2}, train: {lr: 0.002}}}"))
    val_points: int = Field(20, ge=1, description="validation estimates per run: points on the bits-per-byte curve")
    decode_tokens: int = Field(200, ge=1, description="tokens generated greedily at batch 1 to time decoding")

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        known = ModelConfig.model_fields["arch"].annotation.__args__  # the Literal's choices
        for where, names in (("compare.archs", self.archs), ("compare.recipes", list(self.recipes))):
            for name in names:
                if name not in known:
                    raise ValueError(f"{where}: unknown architecture '{name}' (choose from {', '.join(known)})")
        if len(set(self.archs)) != len(self.archs):
            raise ValueError(f"compare.archs lists an architecture twice: {self.archs}")
        for arch, tree in self.recipes.items():
            fixed = {"name", "runs_dir", "compare"} & set(tree)
            if fixed or "arch" in (tree.get("model") or {}):
                key = sorted(fixed)[0] if fixed else "model.arch"
                raise ValueError(f"compare.recipes.{arch}.{key}: set by compare-archs itself, not by a recipe")
        return self


# ------------------------------------------------------------------------ collect
class SourceConfig(Section):
    """One place documents come from: set exactly one of path, dataset, sql, or urls / urls_file / sitemap."""

    path: str | None = Field(None, description=(
        "file, folder (read recursively) or glob: .txt .md .html .epub .jsonl .csv .tsv .parquet, "
        "optionally compressed .gz/.xz/.bz2/.zst"))
    include: list[str] = Field(default_factory=list, description=(
        "folder filter: keep only files matching one of these globs (no '/' = file name, else path in the folder)"))
    exclude: list[str] = Field(default_factory=list, description="folder filter: skip files matching these globs")
    format: Literal["auto", "text", "html", "epub", "jsonl", "csv", "parquet"] = Field("auto", description=(
        "file format; auto = from the file name"))
    text_field: str = Field("text", description="JSONL / CSV / Parquet / dataset / SQL column holding the text")
    id_field: str | None = Field(None, description="column holding a document id (None = file:line or row number)")
    dataset: str | None = Field(None, description=(
        "Hugging Face dataset on disk: a folder written by save_to_disk, or a folder of data files"))
    split: str = Field("train", description="dataset split to read")
    sql: str | None = Field(None, description=(
        "SQLAlchemy database URL, e.g. sqlite:///notes.db or postgresql+psycopg://user@host/db"))
    query: str | None = Field(None, description="SQL query whose rows are documents (with sql)")
    urls: list[str] = Field(default_factory=list, description="web pages to fetch (http/https)")
    urls_file: str | None = Field(None, description="file listing web pages, one URL per line (# comments)")
    sitemap: str | None = Field(None, description="URL of a sitemap (or sitemap index) listing the pages to fetch")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        """A bare string is a path, or a web page when it starts with http:// or https://."""
        if isinstance(data, str):
            return {"urls": [data]} if data.startswith(("http://", "https://")) else {"path": data}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        kinds = [k for k, on in (("path", self.path), ("dataset", self.dataset), ("sql", self.sql),
                                 ("web", self.urls or self.urls_file or self.sitemap)) if on]
        if len(kinds) != 1:
            raise ValueError("each collect.sources entry needs exactly one of path, dataset, sql, "
                             f"urls/urls_file/sitemap (got {', '.join(kinds) or 'none'})")
        if (self.sql is None) != (self.query is None):
            raise ValueError("collect.sources: sql and query go together")
        return self

    @property
    def kind(self) -> str:
        return "path" if self.path else "dataset" if self.dataset else "sql" if self.sql else "web"


class WebConfig(Section):
    user_agent: str = Field("lmforge/0.1 (language model data collection)", description=(
        "User-Agent header, also the name matched against robots.txt"))
    robots: bool = Field(True, description="obey robots.txt (disallowed pages are skipped and counted)")
    delay_s: float = Field(1.0, ge=0.0, description=(
        "minimum seconds between two requests to the same host (robots.txt Crawl-delay raises it)"))
    timeout_s: float = Field(10.0, gt=0.0, description="seconds to wait for a connection or for data")
    retries: int = Field(2, ge=0, description="retries after a timeout, connection error, 429 or 5xx")
    backoff_s: float = Field(1.0, ge=0.0, description="first retry waits this long, then twice as long each time")
    max_bytes: int = Field(5_000_000, ge=1024, description="pages larger than this are skipped ('too_large')")
    max_pages: int = Field(0, ge=0, description="stop after this many pages per source (0 = no limit)")


class CollectConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description=(
        "where documents come from, besides the paths of data.train (both empty = the embedded corpus)"))
    web: WebConfig = Field(default_factory=WebConfig, description="web fetching: politeness, retries, limits")
    strict: bool = Field(False, description=(
        "stop at the first bad input (malformed line, unreadable file, failed query, failed page); "
        "false = skip it, count it and go on"))
    shard_mb: float = Field(32.0, gt=0.0, description="size of the JSONL shards written (MB of text)")


# -------------------------------------------------------------------------- clean
class NormalizeConfig(Section):
    html: bool = Field(True, description=(
        "documents that are HTML markup (e.g. raw pages in JSONL) are reduced to their main text (trafilatura)"))
    fix_unicode: bool = Field(True, description="repair mojibake and HTML entities with ftfy")
    form: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalization form")
    whitespace: bool = Field(True, description=(
        "unify line endings and odd spaces, strip trailing spaces, at most one blank line in a row"))
    control_chars: bool = Field(True, description="remove control characters (NUL etc.; tab and newline stay)")
    lowercase: bool = Field(False, description="lowercase everything (classic recipe; off by default)")
    special_chars: bool = Field(False, description=(
        "remove characters other than letters, digits, whitespace and basic punctuation (classic recipe)"))


class LinesConfig(Section):
    navigation: bool = Field(True, description="remove menu / breadcrumb lines (short items between | » › · • >)")
    boilerplate: bool = Field(True, description=(
        "remove C4's boilerplate lines: javascript, cookie and privacy notices, terms of use"))
    lorem_ipsum: bool = Field(True, description="remove lines containing 'lorem ipsum'")
    min_words: int = Field(0, ge=0, description="remove lines with fewer words (C4 uses 3; 0 = keep all)")
    terminal_punct: bool = Field(False, description="keep only lines ending in . ! ? or a quote (C4; off: verse)")


class QualityConfig(Section):
    gopher_quality: bool = Field(True, description=(
        "Gopher (Rae et al. 2021) rules: word count, mean word length, symbols, bullets, ellipses, stop words"))
    gopher_repetition: bool = Field(False, description=(
        "Gopher repetition rules: duplicate lines, paragraphs, n-grams (off by default: plays repeat speaker names)"))
    c4: bool = Field(False, description=(
        "C4 (Raffel et al. 2020) page rules: curly brackets, lorem ipsum, fewer than 5 sentences"))
    fineweb: bool = Field(False, description=(
        "FineWeb (Penedo et al. 2024) rules: punctuated lines, short lines, duplicated-line characters"))
    min_words: int = Field(50, ge=0, description="Gopher: fewest words in a document")
    max_words: int = Field(100_000, ge=1, description="Gopher: most words in a document")
    min_mean_word_len: float = Field(3.0, ge=0.0, description="Gopher: smallest mean word length")
    max_mean_word_len: float = Field(10.0, gt=0.0, description="Gopher: largest mean word length")
    max_symbol_ratio: float = Field(0.1, ge=0.0, description="Gopher: most '#' and '...' per word")
    min_stop_words: int = Field(2, ge=0, description="Gopher: fewest of the, be, to, of, and, that, have, with")


class LanguageConfig(Section):
    enabled: bool = Field(True, description="identify each document's language with py3langid (meta.lang)")
    keep: list[str] = Field(default_factory=lambda: ["en"], description=(
        "ISO 639-1 codes to keep (empty = keep every language, still tagged)"))
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="drop documents whose best language is less sure")
    max_chars: int = Field(2000, ge=100, description=(
        "characters read from each document to decide (py3langid reads about 1 MB/s)"))


class PIIConfig(Section):
    emails: bool = Field(True, description="replace e-mail addresses")
    phones: bool = Field(True, description="replace phone numbers (international and common national formats)")
    ips: bool = Field(True, description="replace IPv4 and IPv6 addresses")
    email_replacement: str = Field("email@example.com", description="what an e-mail address becomes")
    phone_replacement: str = Field("<PHONE>", description="what a phone number becomes")
    ip_replacement: str = Field("192.0.2.1", description="what an IP address becomes (an address reserved for docs)")


class DedupConfig(Section):
    exact: bool = Field(True, description="drop documents whose normalised text was seen before")
    near: bool = Field(True, description="drop near-duplicates (MinHash LSH)")
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="estimated Jaccard similarity that makes a near-copy")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    shingle_words: int = Field(5, ge=1, description="words per shingle")
    decontaminate: list[str] = Field(default_factory=list, description=(
        "evaluation files or folders: drop training documents sharing a long n-gram with them "
        "(data.val and eval.text are added automatically)"))
    ngram: int = Field(13, ge=3, description="decontamination n-gram length in words (13 as in GPT-3)")


class CleanConfig(Section):
    enabled: bool = Field(True, description="false = pass the collected documents through unchanged (still counted)")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="character-level repair")
    lines: LinesConfig = Field(default_factory=LinesConfig, description="line-level filters")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="document quality filters")
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="language identification")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="personal data scrubbing")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="deduplication and decontamination")
    workers: int = Field(0, ge=0, description="processes cleaning shards in parallel (0 = one per CPU, at most one per shard)")
    rejects: bool = Field(True, description="write dropped documents with their reason to clean/rejects/")
    rejects_max_chars: int = Field(0, ge=0, description="keep this many characters of a rejected text (0 = all)")


# ------------------------------------------------------------------ serve / export
class ServeConfig(Section):
    host: str = Field("127.0.0.1", description=(
        "address to listen on; 127.0.0.1 = this machine only, 0.0.0.0 = every interface (set an api_key then)"))
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port, printed at start)")
    model_name: str | None = Field(None, description=(
        "the model id clients send and /v1/models lists; None = the run's name"))
    api_key: str | None = Field(None, description=(
        "require 'Authorization: Bearer KEY' on /v1/*; None = the LMFORGE_API_KEY environment variable, "
        "or no key when that is unset too"))
    max_batch: int = Field(32, ge=1, description="sequences decoded together (continuous batching); n counts each")
    max_waiting: int = Field(64, ge=0, description="requests queued beyond the batch; more are refused with 429")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    default_max_tokens: int = Field(256, ge=1, description=(
        "completion length when a chat request gives no max_tokens (capped by the context that is left)"))
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")


class ExportConfig(Section):
    format: Literal["hf", "gguf", "lmforge"] = Field("hf", description=(
        "'hf' = Hugging Face folder (transformers loads it; Transformer only), 'gguf' = llama.cpp file "
        "(Transformer only), 'lmforge' = safetensors + config + tokenizer for any architecture"))
    out: str | None = Field(None, description="output folder (for gguf: the .gguf file); None = RUN/export/FORMAT")
    gguf_type: Literal["f32", "f16", "q8_0"] = Field("f32", description=(
        "GGUF weight type of the matrices (norms stay f32)"))
    check: bool = Field(True, description=(
        "after writing, load the export back and compare its logits with lmforge's (fails beyond the tolerance)"))


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.\-]+$", description="run name: outputs go to runs_dir/name")
    runs_dir: str = Field("runs", description="folder holding all runs")
    seed: int = Field(1337, description="global seed: data split, init, batch order, dropout")
    data: DataConfig = Field(default_factory=DataConfig, description="where the text comes from")
    collect: CollectConfig = Field(default_factory=CollectConfig, description=(
        "collect stage: read files, datasets, databases and web pages into document shards"))
    clean: CleanConfig = Field(default_factory=CleanConfig, description=(
        "clean stage: repair, filter, scrub, deduplicate and decontaminate the collected documents"))
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="tokenizer training")
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture and size")
    train: TrainConfig = Field(default_factory=TrainConfig, description="pre-training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation on held-out text")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="text generation")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="architecture bake-off (compare-archs)")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="hyperparameter search (lmforge sweep)")
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
