"""The ``finetune`` config section: start from a pretrained model and adapt it (``lmforge finetune``).

Fields that shape the optimisation (lr, steps, schedule, batch) are the fine-tuning run's own; the
rest of the training options (device, threads, weight decay, clipping, logging) come from ``train``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import INVALIDATES, IRRELEVANT, RESUMABLE, Section, reuse


class LoraConfig(Section):
    rank: int = Field(0, ge=0, description=(
        "LoRA rank r: train low-rank adapters (B @ A, r columns) beside frozen base weights; 0 = off "
        "(full fine-tuning of the trainable layers)"))
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the adapter's output is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "dropout on the adapter's input (Linear and Conv1d adapters; LSTM/GRU adapters have none)"))
    targets: list[str] = Field(default_factory=list, description=(
        "modules to adapt: names (q, v, mlp.down), dotted paths or glob patterns (layers.*.attn.q); "
        "empty = every Linear, Conv1d, LSTM and GRU except the output head"))
    quantize: Literal["none", "4bit"] = Field("none", description=(
        "QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes) under the adapters; needs a CUDA GPU "
        "and finetune.lora.rank >= 1 (refused otherwise; the 4-bit path itself is not in this version yet); "
        "'none' = full-precision base"), json_schema_extra=reuse(added=True))

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.quantize != "none" and not self.rank:
            raise ValueError(f"finetune.lora.quantize={self.quantize} quantizes the base under LoRA adapters; "
                             f"set finetune.lora.rank >= 1 too")
        return self


class PreferenceConfig(Section):
    beta: float | None = Field(None, gt=0, description=(
        "preference modes: how strongly the loss pushes the reward margin; DPO: scale of the log-probability "
        "ratios to the reference (None = 0.1); SimPO: scale of the length-normalised log-probabilities "
        "(None = 2.0)"), json_schema_extra=reuse(added=True))
    gamma: float = Field(0.5, ge=0, description="SimPO: the target reward margin between chosen and rejected answers",
                         json_schema_extra=reuse(added=True))
    nll: float = Field(0.0, ge=0, description=(
        "preference modes: weight of the chosen answers' own loss (negative log-likelihood per token) added to "
        "the preference loss, so they stay likely while the margin widens (RPO); 0 = off"),
        json_schema_extra=reuse(added=True))
    # The dpo stage of `lmforge run`: the finetune stage's own result does not depend on these.
    stage: Literal["off", "dpo", "simpo"] = Field("off", description=(
        "lmforge run: after the finetune stage, tune its chat model (or the pre-trained one when "
        "finetune.enabled is false) on preference pairs with this loss (the dpo stage, runs/<name>/dpo)"),
        json_schema_extra=reuse(finetune=IRRELEVANT, dpo=INVALIDATES))
    data: list[str] = Field(default_factory=list, description=(
        "the dpo stage's pairs (JSONL); empty = the embedded Shakespeare preference set"),
        json_schema_extra=reuse(finetune=IRRELEVANT, dpo=INVALIDATES))
    steps: int = Field(100, ge=1, description="the dpo stage's optimizer steps",
                       json_schema_extra=reuse(finetune=IRRELEVANT, dpo=RESUMABLE))
    lr: float = Field(1e-4, gt=0, description="the dpo stage's peak learning rate",
                      json_schema_extra=reuse(finetune=IRRELEVANT, dpo=INVALIDATES))


class FinetuneConfig(Section):
    enabled: bool = Field(False, description=(
        "lmforge run: fine-tune after pre-training and evaluation (the finetune stage); `lmforge finetune` "
        "always runs"), json_schema_extra=reuse(finetune=RESUMABLE))
    init: str | None = Field(None, description=(
        "pretrained model to start from (--init PATH): a lmforge run folder, checkpoint or export, or a local "
        "Hugging Face folder; None = this run's own pre-trained model"))
    mode: Literal["text", "chat", "dpo", "simpo"] = Field("chat", description=(
        "'text' = domain adaptation on plain text (next-token loss on every token); 'chat' = conversations "
        "in OpenAI messages JSONL, loss on assistant turns only; 'dpo' / 'simpo' = preference tuning on "
        "JSONL pairs {\"prompt\" or \"messages\", \"chosen\", \"rejected\"}: DPO against the starting model "
        "(the base with adapters off for LoRA), or reference-free SimPO; the loss covers the answers only"))
    pack: bool | Literal["auto"] = Field("auto", description=(
        "chat: lay a step's conversations end to end in rows of model.context tokens, each attending only "
        "to itself with positions from 0 (the same loss, no padding); 'auto' = when it saves at least a "
        "fifth of the positions and the model can keep examples apart (Transformer; LSTM/GRU/CNN cannot). "
        "text: true keeps the documents of a window apart the same way (auto and false: plain windows)"),
        json_schema_extra=reuse(added=True))
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description=(
        "preference tuning (finetune.mode=dpo or simpo)"))
    data: list[str] = Field(default_factory=list, description=(
        "training data: for chat, JSONL files of {\"messages\": [{\"role\", \"content\"}, ...]}; for text, files, "
        "folders or globs in any format the data stage reads; empty (chat) = the embedded Shakespeare "
        "question-answer set"))
    val: list[str] = Field(default_factory=list, description=(
        "validation data in the same format; empty = hold out finetune.val_fraction of the training items "
        "(chat: conversations, text: documents) chosen with the seed"))
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share held out for validation when finetune.val is empty")
    steps: int = Field(200, ge=1, description="optimizer steps of fine-tuning",
                       json_schema_extra=reuse(finetune=RESUMABLE))
    lr: float = Field(3e-4, gt=0, description="peak learning rate (lower than pre-training's: the weights are already good)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final learning rate as a fraction of finetune.lr")
    schedule: Literal["cosine", "wsd", "constant", "linear"] = Field("cosine", description=(
        "after warmup: cosine decay, warmup-stable-decay, constant, or linear decay"))
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    batch_size: int = Field(8, ge=1, description="sequences (conversations or text windows) per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    eval_every: int = Field(50, ge=0, description="estimate validation loss every N steps (0 = only at the end)",
                            json_schema_extra=reuse(finetune=RESUMABLE))
    eval_batches: int = Field(8, ge=1, description="micro-batches per validation estimate",
                              json_schema_extra=reuse(finetune=RESUMABLE))
    ckpt_every: int = Field(100, ge=0, description="checkpoint every N steps (0 = only at the end)",
                            json_schema_extra=reuse(finetune=RESUMABLE))
    stop_at: int | None = Field(None, ge=1, description=(
        "end this invocation after this step with a checkpoint, as if interrupted; a later run resumes"),
        json_schema_extra=reuse(finetune=RESUMABLE))
    max_seconds: float | None = Field(None, gt=0, description="stop after this much fine-tuning time (None = no limit)",
                                      json_schema_extra=reuse(finetune=RESUMABLE))
    max_length: int | None = Field(None, ge=2, description=(
        "longest training sequence in tokens; None = the model's context. Longer conversations lose whole "
        "turns from the end; text is cut into windows of this length"))
    train_layers: int | None = Field(None, ge=0, description=(
        "train only the last N blocks (layers) and what follows them; None = all layers; with LoRA, adapters "
        "go into the last N blocks only"))
    freeze_embeddings: bool = Field(False, description=(
        "keep the token embedding (and a head tied to it) frozen"))
    loss_on: Literal["all_assistant", "last_assistant"] = Field("all_assistant", description=(
        "chat: which assistant turns carry the loss: every one, or only the last of each conversation"))
    on_bad_line: Literal["skip", "stop"] = Field("stop", description=(
        "chat data: a malformed line (bad JSON, unknown role, empty content, no assistant turn) stops with "
        "its file and line ('stop'), or is skipped and counted in the stage's report ('skip')"))
    heldout_task: str | None = Field(None, description=(
        "chat multiple-choice task (JSONL of {messages, choices, label}) scored before and after "
        "fine-tuning; for dpo/simpo, held-out preference pairs; None = the embedded set's held-out task "
        "(or pairs) when finetune.data is empty, else (dpo/simpo) the validation pairs"),
        json_schema_extra=reuse(finetune=RESUMABLE))
    lora: LoraConfig = Field(default_factory=LoraConfig, description="low-rank adapters (LoRA)")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.mode == "text" and not self.data:
            raise ValueError("finetune.data: text fine-tuning needs files (finetune.mode=text); "
                             "the embedded sets are for finetune.mode=chat, dpo and simpo")
        return self
