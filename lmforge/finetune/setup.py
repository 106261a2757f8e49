"""The fine-tuning job: what THE training loop runs to fine-tune instead of pre-train.

:func:`build_job` builds a :class:`~lmforge.train.job.TrainJob` like pre-training's, from the
fine-tuning run's own pieces: the pretrained model's tokenizer, the prepared data folder and its loader
(chat batches or text shards), the output folder, and a ``prepare`` step on the freshly built model
(load the pretrained weights, then either attach LoRA adapters, base frozen, or freeze what
``finetune.train_layers`` / ``freeze_embeddings`` leave out). Everything else (optimizer over the
trainable parameters, schedule, checkpoints, exact resume, validation, logging) is the loop's own.

:func:`prepare_data` writes the data folder once: token shards for text, encoded conversations for
chat (see :mod:`lmforge.finetune.data`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from lmforge.config import ConfigError, FinetuneConfig, RunConfig
from lmforge.data.chat import IM_END, IM_START, ChatTemplateError, template_end_token
from lmforge.data.loader import TokenLoader
from lmforge.data.readers.files import stage_texts
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import Tokenizer
from lmforge.finetune.chat import encode_all, read_conversations
from lmforge.finetune.data import ChatLoader, PairLoader, save_examples
from lmforge.finetune.pairs import pair_stats, read_pairs, save_pairs
from lmforge.train import lora
from lmforge.train.job import Record, TrainJob
from lmforge.train.job import build_job as build_train_job
from lmforge.train.preference import PreferenceObjective, frozen_copy

EMBEDDED_DIR = Path(__file__).parent / "sets"  # the embedded fine-tuning set (build_set.py writes it)
EMBEDDED_TRAIN, EMBEDDED_VAL, EMBEDDED_TASK = "shakespeare_qa_train.jsonl", "shakespeare_qa_val.jsonl", \
    "shakespeare_qa_heldout.jsonl"
# The embedded preference set (finetune.mode=dpo|simpo): the true next line of a speech against a wrong one.
PAIRS_TRAIN, PAIRS_VAL, PAIRS_HELDOUT = "shakespeare_pairs_train.jsonl", "shakespeare_pairs_val.jsonl", \
    "shakespeare_pairs_heldout.jsonl"
PREFERENCE = ("dpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


def build_job(cfg: RunConfig, out: Path, tokenizer: Tokenizer, tokenizer_path: Path,
              init_state: dict[str, Tensor], context: int, fingerprint: Callable[[RunConfig], str],
              bytes_per_token: float | None) -> TrainJob:
    """The fine-tuning job over ``out`` (checkpoints in ``ckpt/``, data in ``data/``), starting from
    ``init_state``, the pretrained weights; ``cfg`` is the run config with the fine-tuning train fields."""
    ft = cfg.finetune

    def prepare(model: nn.Module) -> dict[str, Record]:
        """Pretrained weights in, then adapters or frozen layers; before the optimizer is built."""
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"the pretrained weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        if not ft.lora.rank:
            freeze(model, ft.train_layers, ft.freeze_embeddings)
            return {}
        targets = lora.attach_lora(model, ft.lora, ft.train_layers)
        return {"lora": Record({"config": ft.lora.model_dump(), "targets": targets})}  # to rebuild the adapters

    if ft.mode == "chat":
        loader = functools.partial(ChatLoader, pad_id=tokenizer.pad_id, pack=packing(cfg))
    elif ft.mode in PREFERENCE:
        loader = functools.partial(PairLoader, pad_id=tokenizer.pad_id)
    else:  # text: documents kept apart only when asked (no padding to save; auto keeps the plain windows)
        loader = functools.partial(TokenLoader, doc_ids=True) if packing(cfg) is True else TokenLoader
    return build_train_job(cfg, tokenizer=tokenizer, tokenizer_path=tokenizer_path, data_dir=out / "data",
                           out_dir=out, fingerprint=fingerprint, context=context, make_loader=loader,
                           prepare=prepare, bytes_per_token=bytes_per_token, objective=objective(ft))


def packing(cfg: RunConfig) -> bool | str:
    """``finetune.pack`` for this model: the Transformer and wrapped Hugging Face families made of attention
    layers keep packed examples apart (block-diagonal mask, positions from 0); recurrent, convolution
    and hybrid models would carry their state across them."""
    pack = cfg.finetune.pack
    if cfg.model.arch == "transformer":
        return pack
    if cfg.model.arch == "hf":
        from lmforge.models.hf_causal import packs_examples

        if packs_examples(cfg.model.hf_config):
            return pack
    if pack is True:
        what = cfg.model.hf_config.get("model_type") if cfg.model.arch == "hf" else cfg.model.arch
        raise ConfigError(f"finetune.pack=true: a {what} model carries its state across the examples of a packed "
                          f"row; use finetune.pack=false (or auto)")
    return False


def objective(ft: FinetuneConfig) -> Callable[[nn.Module, nn.Module], nn.Module] | None:
    """The preference loss around the model (None for chat and text: the model's own loss)."""
    if ft.mode not in PREFERENCE:
        return None
    beta, nll = ft.preference.beta or DEFAULT_BETA[ft.mode], ft.preference.nll

    def build(model: nn.Module, fwd: nn.Module) -> nn.Module:
        if ft.mode == "simpo":
            return PreferenceObjective(fwd, "simpo", beta, ft.preference.gamma, nll=nll)
        if ft.lora.rank:  # the reference is the base itself, adapters off: one copy of the weights
            return PreferenceObjective(fwd, "dpo", beta, adapters_off=lambda: lora.adapters_disabled(model), nll=nll)
        return PreferenceObjective(fwd, "dpo", beta, reference=frozen_copy(model), nll=nll)
    return build


def freeze(model: nn.Module, train_layers: int | None, freeze_embeddings: bool) -> None:
    """Full fine-tuning of the last ``train_layers`` blocks (None = all) and of what is not in a block."""
    n_layers = model.cfg.n_layers
    tied = {id(model.tok_emb.weight)}
    for name, p in model.named_parameters():
        layer = lora.layer_of(name)
        trainable = train_layers is None or layer is None or layer >= n_layers - train_layers
        if freeze_embeddings and id(p) in tied:
            trainable = False
        p.requires_grad_(trainable)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("finetune.train_layers=0 with finetune.freeze_embeddings leaves nothing to train")


# ------------------------------------------------------------------ data
def data_files(cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """The training and validation files; an empty finetune.data means the embedded set (chat or pairs)."""
    if cfg.data:
        return list(cfg.data), list(cfg.val)
    train, val = (PAIRS_TRAIN, PAIRS_VAL) if cfg.mode in PREFERENCE else (EMBEDDED_TRAIN, EMBEDDED_VAL)
    return [str(EMBEDDED_DIR / train)], list(cfg.val) or [str(EMBEDDED_DIR / val)]


def prepare_data(cfg: RunConfig, tok: Tokenizer, max_length: int, data_dir: Path) -> dict:
    """Write the fine-tuning data into ``data_dir``; returns its statistics."""
    ft = cfg.finetune
    train_files, val_files = data_files(ft)
    data_dir.mkdir(parents=True, exist_ok=True)
    if ft.mode == "text":
        return _prepare_text(cfg, tok, max_length, data_dir, train_files, val_files)
    if ft.mode in PREFERENCE:
        return _prepare_pairs(cfg, tok, max_length, data_dir, train_files, val_files)
    convs, report = read_conversations(train_files, ft.on_bad_line)
    if val_files:
        val_convs, _ = read_conversations(val_files, ft.on_bad_line, report)
    else:  # hold out whole conversations, chosen with the seed
        order = np.random.default_rng(cfg.seed).permutation(len(convs))
        n_val = max(1, round(ft.val_fraction * len(convs)))
        held = set(order[:n_val].tolist())
        val_convs = [c for i, c in enumerate(convs) if i in held]
        convs = [c for i, c in enumerate(convs) if i not in held]
    stats = {"mode": "chat", "files": {"train": train_files, "val": val_files}, "read": report.as_dict()}
    for split, items in (("train", convs), ("val", val_convs)):
        examples, s = encode_all(tok, items, max_length, ft.loss_on)
        if not examples:
            raise DataError(f"no usable {split} conversation in {', '.join(val_files if split == 'val' else train_files)}"
                            f" ({json.dumps(s['dropped'])}; finetune.max_length={max_length})")
        save_examples(examples, data_dir / f"chat_{split}.npz")
        stats[split] = s
    return stats


def check_chat_tokenizer(tok: Tokenizer) -> None:
    """Refuse, before anything is written, a model that cannot be chat fine-tuned: its own template cannot
    mark the assistant's tokens, or it has no template and no ChatML tokens."""
    if tok.chat_template is not None:
        try:
            template_end_token(tok)
        except ChatTemplateError as e:
            raise ConfigError(f"{e}; fine-tune it with finetune.mode=text, or give its folder a chat_template.jinja "
                              f"with role markers") from None
    elif tok.token_to_id(IM_START) is None or tok.token_to_id(IM_END) is None:
        raise ConfigError(f"the pretrained model's tokenizer has no {IM_START} / {IM_END} tokens and no chat "
                          f"template, so it cannot be chat fine-tuned; use finetune.mode=text or a tokenizer "
                          f"trained by lmforge")


def _prepare_pairs(cfg: RunConfig, tok: Tokenizer, max_length: int, data_dir: Path,
                   train_files: list[str], val_files: list[str]) -> dict:
    ft = cfg.finetune
    pairs, report = read_pairs(train_files, tok, max_length, ft.on_bad_line)
    if val_files:
        val_pairs, _ = read_pairs(val_files, tok, max_length, ft.on_bad_line, report)
    else:  # hold out whole pairs, chosen with the seed
        held = set(np.random.default_rng(cfg.seed).permutation(len(pairs))[: max(1, round(ft.val_fraction * len(pairs)))])
        val_pairs = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
    stats = {"mode": ft.mode, "files": {"train": train_files, "val": val_files}, "read": report.as_dict()}
    for split, items in (("train", pairs), ("val", val_pairs)):
        if not items:
            raise DataError(f"no usable {split} preference pair in "
                            f"{', '.join(val_files if split == 'val' else train_files)} ({report.as_dict()['skipped']})")
        save_pairs(items, data_dir / f"pairs_{split}.npz")
        stats[split] = pair_stats(items)
    return stats


def _prepare_text(cfg: RunConfig, tok: Tokenizer, max_length: int, data_dir: Path,
                  train_files: list[str], val_files: list[str]) -> dict:
    from lmforge.data import pack, split

    docs_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "train": train_files, "val": val_files, "val_fraction": cfg.finetune.val_fraction, "val_docs": []})})
    docs = split.main(docs_cfg, data_dir / "docs")
    out: dict = {"mode": "text", "files": {"train": train_files, "val": val_files}, "docs": docs}
    for name in ("train", "val"):
        out[name] = pack.write_shards(stage_texts(data_dir / "docs" / f"{name}.jsonl"), tok, data_dir, name,
                                      cfg.data.shard_tokens)
    if out["train"]["tokens"] < max_length + 1 or out["val"]["tokens"] < 2:
        raise DataError(f"fine-tuning text too short: {out['train']['tokens']} training tokens (one sequence "
                        f"needs {max_length + 1}) and {out['val']['tokens']} validation tokens")
    return out
