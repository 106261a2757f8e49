"""Config sections of the spine and its verbs: data, tokenizer, model, train, eval, sample, sweep,
compare, plan, serve and export. Each field's description is its ``--help`` text."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import INVALIDATES, IRRELEVANT, RESUMABLE, Section, reuse

# --------------------------------------------------------------------------- data
# How the data stages run (executor, tasks, Slurm) never changes what they produce.
_HOW = reuse(docs=IRRELEVANT, bakeoff=IRRELEVANT, clean=IRRELEVANT)


class SlurmConfig(Section):
    partition: str | None = Field(None, description="Slurm partition the job array is submitted to (required)")
    time: str = Field("24:00:00", description="time limit per task (sbatch --time)")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per task (sbatch --cpus-per-task)")
    mem_per_cpu_gb: int = Field(2, ge=1, description="memory per CPU in GB (sbatch --mem-per-cpu)")
    job_name: str = Field("lmforge-clean", description="job name prefix; each datatrove stage adds its own suffix")
    qos: str = Field("", description="quality of service (sbatch --qos); empty = the cluster's default")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description=(
        "more sbatch options, e.g. {account: myproject, constraint: cpu}"))
    env_command: str | None = Field(None, description=(
        "shell line that makes lmforge importable in a job (e.g. 'source /shared/venv/bin/activate'); "
        "None = activate the Python environment running lmforge"))
    logs_dir: str | None = Field(None, description=(
        "where Slurm writes each task's output; None = clean/work/slurm_logs in the run folder"))
    poll_seconds: float = Field(5.0, gt=0, description="how often lmforge checks whether the job array finished")


class DataConfig(Section):
    train: list[str] = Field(default_factory=list, description=(
        "training text: files, folders or globs (.txt .md .html .epub .jsonl .csv .parquet, optionally "
        ".gz/.xz/.bz2/.zst), read by the collect stage with collect.sources; both empty = the embedded "
        "Shakespeare corpus"), json_schema_extra=reuse(top=("collect",), collect=INVALIDATES))
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
        "tokens per packed shard file; a shard closes at the first document boundary past it"),
        json_schema_extra=reuse(top=("pack",), pack=INVALIDATES))
    executor: Literal["local", "slurm"] = Field("local", description=(
        "what runs the data stages' datatrove tasks (collect, clean, pack): 'local' = processes on this machine, "
        "'slurm' = a job array on a Slurm cluster (data.slurm); the kept documents are the same either way"),
        json_schema_extra=_HOW)
    tasks: int = Field(1, ge=1, description=(
        "datatrove tasks the work is split into (collect: ranges of files and sources; clean, pack: contiguous "
        "ranges of documents); a killed run redoes only the unfinished ones"), json_schema_extra=_HOW)
    workers: int = Field(0, ge=0, description=(
        "tasks running at once (0 = one per CPU for local, no limit for slurm)"), json_schema_extra=_HOW)
    slurm: SlurmConfig = Field(default_factory=lambda: SlurmConfig(), description=(
        "cluster settings for data.executor=slurm"), json_schema_extra=_HOW)


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
    sample_bytes: int = Field(100_000_000, ge=1, description=(
        "train on a seeded sample of about this many bytes of training text, documents drawn evenly from the "
        "whole corpus (all of it when smaller)"), json_schema_extra=reuse(added=True))


# -------------------------------------------------------------------------- model
class TransformerConfig(Section):
    n_heads: int = Field(4, ge=1, description="attention heads")
    n_kv_heads: int | None = Field(None, ge=1, description=(
        "key/value heads for grouped-query attention; None = n_heads (must divide n_heads)"))
    ffn_hidden: int | None = Field(None, ge=1, description=(
        "MLP hidden width; None = 8/3 * d_model rounded up to a multiple of 32 for swiglu (Llama's rule), "
        "4 * d_model for gelu and relu2 (GPT-2's)"))
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base (pos=rope)")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm / LayerNorm epsilon")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys (not Llama-compatible; export refuses)")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description=(
        "block and final norms: 'rmsnorm' (Llama) or 'layernorm' with a bias (GPT-2)"))
    pos: Literal["rope", "learned"] = Field("rope", description=(
        "positions: 'rope' = rotary (Llama) or 'learned' = an absolute embedding per position up to "
        "model.context, added to the token embedding (GPT-2)"))
    mlp: Literal["swiglu", "gelu", "relu2"] = Field("swiglu", description=(
        "MLP: 'swiglu' = gated SiLU, 3 matrices (Llama); 'gelu' = 2 matrices with tanh-approximated GELU "
        "(GPT-2); 'relu2' = 2 matrices with squared ReLU"))
    bias: bool = Field(False, description="biases in the attention and MLP linear layers (GPT-2 has them, Llama not)")


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


# The names of the model registry, written once: lmforge.models.REGISTRY pairs each with its class, in
# this order. They live here because the models import config, never the other way round. "hf" wraps a
# Hugging Face transformers causal LM (model.hf_config): what loading a pre-trained model of any family gives.
ARCHS = ("transformer", "lstm", "gru", "cnn", "hf")
SCRATCH_ARCHS = ARCHS[:4]  # what compare-archs trains by default (hf needs a family's config)


class ModelConfig(Section):
    arch: Literal[ARCHS] = Field("transformer", description=(
        f"architecture from the model registry (lmforge.models.REGISTRY): {', '.join(ARCHS)}"))
    context: int = Field(256, ge=2, le=1_048_576, description="sequence length in tokens (training and decoding window)",
                         json_schema_extra=reuse(top=("pack",), pack=INVALIDATES))
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
    hf_config: dict[str, Any] | None = Field(None, description=(
        "model.arch=hf: the Hugging Face config.json (as a mapping) of the transformers model to build; set "
        "when a Hugging Face folder is opened, so checkpoints rebuild the same family"),
        json_schema_extra=reuse(added=True, train=INVALIDATES, finetune=INVALIDATES, bakeoff=INVALIDATES))

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        t = self.transformer
        if self.arch == "transformer":
            # With a parameter budget the width is chosen later, as a multiple of 2 * n_heads.
            if self.d_model % t.n_heads and self.param_budget is None:
                raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                                 f"model.transformer.n_heads ({t.n_heads})")
            if t.pos == "rope" and (self.d_model // t.n_heads) % 2 and self.param_budget is None:
                raise ValueError("model.d_model / model.transformer.n_heads must be even for rotary embeddings")
            if t.n_kv_heads is not None and t.n_heads % t.n_kv_heads:
                raise ValueError(f"model.transformer.n_kv_heads ({t.n_kv_heads}) must divide "
                                 f"model.transformer.n_heads ({t.n_heads})")
        if (self.arch == "hf") != bool(self.hf_config):
            raise ValueError("model.hf_config is set only for model.arch=hf, which needs it (a Hugging Face "
                             "config.json as a mapping, with its model_type)")
        if self.arch == "hf" and self.param_budget is not None:
            raise ValueError(f"model.param_budget ({self.param_budget}) does not apply to model.arch=hf: the "
                             "family's config (model.hf_config) fixes its size")
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
    steps: int | Literal["auto"] = Field(1000, description=(
        "optimizer steps: the schedule's length; auto = as many as fit in train.max_seconds on this machine, "
        "measured over the first seconds of training and kept in the checkpoints (docs/speedrun.md)"),
        json_schema_extra=reuse(train=RESUMABLE, bakeoff=IRRELEVANT))
    max_seconds: float | None = Field(None, gt=0, description=(
        "stop after this much training time even if steps remain (None = no time limit)"),
        json_schema_extra=reuse(train=RESUMABLE))
    stop_at: int | None = Field(None, ge=1, description=(
        "end this invocation after this step with a checkpoint, as if interrupted; the LR schedule still "
        "spans train.steps, and a later run resumes from there"), json_schema_extra=reuse(train=IRRELEVANT))
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description=(
        "micro-batches accumulated per optimizer step; the global batch is batch_size * grad_accum sequences "
        "whatever the number of ranks (docs/scale.md)"))
    micro_batch: int | None = Field(None, ge=1, description=(
        "sequences per forward pass on each rank under torchrun; None = the largest divisor of the rank's share "
        "(batch_size * grad_accum / ranks) not above batch_size; the accumulation steps follow"),
        json_schema_extra=reuse(train=IRRELEVANT))
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "under torchrun: 'ddp' = a full model copy per rank (DistributedDataParallel), 'fsdp' = parameters, "
        "gradients and optimizer state sharded across ranks (FSDP2), for models too big for one device"),
        json_schema_extra=reuse(train=IRRELEVANT))
    dist_timeout: float = Field(1800.0, gt=0, description=(
        "seconds a rank waits for the others (rendezvous, barriers, collectives) before failing"),
        json_schema_extra=reuse(train=IRRELEVANT))
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final learning rate as a fraction of lr")
    schedule: Literal["cosine", "wsd", "constant", "linear"] = Field("cosine", description=(
        "after warmup: cosine decay, warmup-stable-decay, constant, or linear decay"))
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps spent decaying at the end")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (matrices only; not norms, biases)",
                                json_schema_extra=reuse(finetune=INVALIDATES))
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1", json_schema_extra=reuse(finetune=INVALIDATES))
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2", json_schema_extra=reuse(finetune=INVALIDATES))
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon", json_schema_extra=reuse(finetune=INVALIDATES))
    optimizer: Literal["adamw", "muon"] = Field("adamw", description=(
        "adamw for every parameter, or muon: Muon for the hidden 2-D weights and AdamW for embeddings, "
        "head, norms and biases"))
    muon_lr_scale: float = Field(1.0, gt=0, description=(
        "muon: the Muon half's learning rate as a multiple of lr (its update is already scaled to AdamW's size)"))
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="muon: Nesterov momentum of the Muon half")
    muon_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description=(
        "muon: dtype of the Newton-Schulz orthogonalisation; auto = bf16 where bf16 matrix products are fast "
        "(GPUs with native bf16; CPUs with bf16 instructions, measured once per process), fp32 elsewhere (bf16 "
        "is ~100x slower on CPUs without them); a resumed run keeps the precision it started with"))
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm to this (0 = off)",
                             json_schema_extra=reuse(finetune=INVALIDATES))
    eval_every: int = Field(100, ge=0, description="estimate validation loss every N steps (0 = only at the end)",
                            json_schema_extra=reuse(train=IRRELEVANT, bakeoff=IRRELEVANT))
    eval_batches: int = Field(8, ge=1, description="micro-batches per in-training validation estimate",
                              json_schema_extra=reuse(train=IRRELEVANT))
    log_every: int = Field(10, ge=1, description="write a metrics line every N steps",
                           json_schema_extra=reuse(train=IRRELEVANT))
    ckpt_every: int = Field(250, ge=0, description="checkpoint every N steps (0 = only at the end)",
                            json_schema_extra=reuse(train=IRRELEVANT))
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk (older ones are deleted)",
                           json_schema_extra=reuse(train=IRRELEVANT))
    resume: bool = Field(True, description="continue from the newest valid checkpoint of the run if one exists",
                         json_schema_extra=reuse(train=IRRELEVANT))
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'",
                        json_schema_extra=reuse(train=IRRELEVANT, finetune=INVALIDATES))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "autocast dtype; auto = bfloat16 on GPUs with native bf16, float32 elsewhere (on CPUs without bf16 "
        "instructions bf16 is ~100x slower)"))
    compile: bool | None = Field(None, description=(
        "torch.compile the model: about 1.25x the tokens/s of eager on a 2-core CPU once compiled, after a "
        "compile of about 80 s (pays off for runs of more than a few minutes; always on GPUs); "
        "None = on for CUDA, off elsewhere"), json_schema_extra=reuse(train=IRRELEVANT))
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)",
                         json_schema_extra=reuse(train=IRRELEVANT))
    tensorboard: bool = Field(True, description="also write TensorBoard events (needs the tensorboard package)",
                              json_schema_extra=reuse(train=IRRELEVANT))
    progress: bool = Field(True, description="show a progress bar", json_schema_extra=reuse(train=IRRELEVANT))
    early_stop_patience: int = Field(0, ge=0, description=(
        "stop when the validation loss has not improved by more than early_stop_min_delta for this many "
        "evaluations in a row (0 = never stop early)"))
    early_stop_min_delta: float = Field(0.0, ge=0.0, description=(
        "smallest drop of the validation loss (nats/token) that counts as an improvement for early stopping"))
    tasks_every: int = Field(0, ge=0, description="also run the eval.tasks every N steps during training (0 = never)",
                             json_schema_extra=reuse(train=IRRELEVANT))
    max_bad_steps: int = Field(5, ge=1, description=(
        "a step whose loss or gradient norm is NaN/inf (or spikes, see spike_factor) is skipped without an "
        "update; stop the run after this many in a row (docs/reliability.md)"),
        json_schema_extra=reuse(train=IRRELEVANT))
    spike_factor: float | None = Field(None, gt=1.0, description=(
        "also skip a step whose loss exceeds this multiple of the running mean loss (None = off)"))
    on_save_error: Literal["stop", "continue"] = Field("stop", description=(
        "when a checkpoint cannot be written (disk full, read-only folder): 'stop' the run, or 'continue' "
        "without that checkpoint, warning each time (the last step's checkpoint must always be written)"),
        json_schema_extra=reuse(train=IRRELEVANT))

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not (whole or value == "auto"):
            raise ValueError(f"train.steps must be a whole number of steps >= 1, or auto (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps == "auto" and self.max_seconds is None:
            raise ValueError("train.steps: auto sizes the schedule to a time budget; set train.max_seconds "
                             "(e.g. 300) or give train.steps a number")
        return self


# --------------------------------------------------------------------------- eval
class EvalConfig(Section):
    text: list[str] = Field(default_factory=list, description=(
        "files or folders to evaluate with `lmforge eval` (empty = the run's validation text)"),
        json_schema_extra=reuse(eval=IRRELEVANT))
    stride: int | None = Field(None, ge=1, description=(
        "sliding-window stride in tokens; None = context (non-overlapping windows); smaller = more context per token"),
        json_schema_extra=reuse(finetune=INVALIDATES))
    batch_size: int = Field(16, ge=1, description="windows per forward pass",
                            json_schema_extra=reuse(finetune=INVALIDATES))
    max_tokens: int | None = Field(None, ge=1, description="evaluate at most this many tokens (None = all)",
                                   json_schema_extra=reuse(finetune=INVALIDATES))
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
        "wall-clock budget of this sweep invocation in seconds (None = none); the trial running at the deadline finishes"))
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
    archs: list[str] = Field(default_factory=lambda: list(SCRATCH_ARCHS), min_length=1,
                             description="architectures `lmforge compare-archs` trains, each under runs_dir/NAME-ARCH")
    budget_seconds: float = Field(300.0, gt=0, description=(
        "training time per architecture in seconds (--budget-seconds); evaluation and checkpoints do not count"))
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "per-architecture config sections laid over this config, e.g. "
        "{lstm: {model: {n_layers: 2}, train: {lr: 0.002}}}"))
    val_points: int = Field(20, ge=1, description="validation estimates per run: points on the bits-per-byte curve")
    decode_tokens: int = Field(200, ge=1, description="tokens generated greedily at batch 1 to time decoding")
    out: str | None = Field(None, description=(
        "lmforge compare: folder for the side-by-side table and curves (--out); None = runs_dir/compare"))

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        known = ARCHS
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


# --------------------------------------------------------------------------- plan
class PlanConfig(Section):
    budget: str | None = Field(None, description=(
        "lmforge plan: the training time to plan for, with its unit: 90s, 5m, 2h (--budget); on this machine, "
        "or on plan.gpu"))
    gpu: str | None = Field(None, description=(
        "plan for this GPU instead of this machine (--gpu h100; also a100, l4, rtx 4090, ...): its datasheet dense "
        "bf16 FLOP/s times plan.mfu give its tokens/s; the loss fit still comes from this machine's probes"))
    gpu_flops: float | None = Field(None, gt=0, description=(
        "with plan.gpu: the FLOP/s training actually reaches there, if measured (replaces datasheet x plan.mfu)"))
    mfu: float = Field(0.4, gt=0, le=1, description=(
        "with plan.gpu: the assumed model FLOPs utilisation (share of the datasheet peak a training step reaches)"))
    probe_sizes: list[list[int]] = Field(default_factory=lambda: [[64, 2], [96, 3], [128, 4], [192, 4]], description=(
        "[width, layers] of the models the probes train (heads = width / 32, at least 1); 3 or more sizes"))
    probe_seconds: list[float] = Field(default_factory=lambda: [10.0, 30.0], description=(
        "training seconds of each probe of each size (train.steps: auto): two or more lengths give the fit its "
        "tokens axis; probes are cached per machine and config, so a second plan reuses them"))
    confirm_fraction: float = Field(0.15, ge=0, lt=1, description=(
        "share of the budget each confirmation probe trains: the fit's first choice and the speedrun's 128x4 "
        "shape, whose results refit the curve and correct the prediction; the choice is made between them "
        "(none when that is no longer than the longest probe, or with plan.gpu)"))
    probe_warmup: int = Field(5, ge=0, description="warmup steps of each probe (the recipe keeps its own)")
    eval_batches: int = Field(32, ge=1, description="validation batches scoring each probe (batch x context tokens each)")
    out: str | None = Field(None, description=(
        "folder for plan.yaml, plan.json and plan.png, and the run the recipe trains; None = "
        "runs_dir/plan-BUDGET (plan-BUDGET-GPU with plan.gpu)"))

    @field_validator("budget", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # YAML reads `budget: 300` as a number: keep it as written, so the parser can say the unit is missing.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        if len(self.probe_sizes) < 3 or any(len(s) != 2 or min(s) < 1 for s in self.probe_sizes):
            raise ValueError(f"plan.probe_sizes must list 3 or more [width, layers] pairs (got {self.probe_sizes})")
        if len(set(self.probe_seconds)) < 2 or min(self.probe_seconds) <= 0:
            raise ValueError(f"plan.probe_seconds must list 2 or more different positive lengths "
                             f"(got {self.probe_seconds})")
        return self


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
    compile: bool = Field(False, description=(
        "compile the one-stream decode step with torch.compile before serving (Transformer): about 1.85x "
        "the eager batch-1 decoding on a CPU (with serve.lookahead), after a compile of 3-30 s at start (inductor caches it on disk)"))
    lookahead: int = Field(8, ge=1, description=(
        "while every running sequence decodes greedily (temperature 0, no penalties), decode up to this many "
        "tokens per model call (never more than about 10 ms of them), so the per-token bookkeeping runs "
        "once per call; streams then receive those tokens together. 1 = one token per call"))


class ExportConfig(Section):
    format: Literal["hf", "gguf", "lmforge"] = Field("hf", description=(
        "'hf' = Hugging Face folder (transformers loads it; Transformer only), 'gguf' = llama.cpp file "
        "(Transformer only), 'lmforge' = safetensors + config + tokenizer for any architecture"))
    out: str | None = Field(None, description="output folder (for gguf: the .gguf file); None = RUN/export/FORMAT")
    gguf_type: Literal["f32", "f16", "q8_0"] = Field("f32", description=(
        "GGUF weight type of the matrices (norms stay f32)"))
    check: bool = Field(True, description=(
        "after writing, load the export back and compare its logits with lmforge's (fails beyond the tolerance)"))
