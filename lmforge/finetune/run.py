"""``lmforge finetune`` and the ``finetune`` stage of ``lmforge run``: adapt a pretrained model.

The pretrained model (``finetune.init``, or the run's own pre-trained model) is loaded, its tokenizer
saved beside the fine-tuning run, the data prepared (:mod:`lmforge.finetune.setup`), and then THE
training loop (:func:`lmforge.train.loop.train`) runs the job :func:`lmforge.finetune.setup.build_job` builds:
the same optimizer, schedule, checkpoints and exact resume as pre-training. Everything goes to
``runs/<name>/finetune/``::

    finetune/config.yaml      the resolved config
    finetune/tokenizer/       the pretrained model's tokenizer (checkpoints point to it)
    finetune/data/            encoded conversations (chat_*.npz) or token shards (text)
    finetune/ckpt/            checkpoints; a run that stops resumes from the newest
    finetune/adapter/         LoRA runs: adapter.safetensors + adapter.json alone; for the Transformer also
                              PEFT's adapter_config.json + adapter_model.safetensors (lmforge.export.peft_adapter);
                              for a model wrapped from Hugging Face PEFT's files only (saved by PEFT)
    finetune/results.json     training summary and the before/after comparison

Usage::

    lmforge finetune --init runs/demo/train --name demo-chat                  # embedded chat set
    lmforge finetune --init runs/demo/train --finetune.mode=text --finetune.data=[notes/] --name notes
    lmforge finetune --init runs/demo/train --finetune.lora.rank=8 --name demo-lora

``--init`` is opened by :func:`lmforge.trained.load_model` under the rule of every verb
(:data:`lmforge.trained.PATH_RULE`): a run folder means its fine-tuned model when it has one, so
``runs/demo/train`` names its pre-trained one.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from lmforge import artifacts
from lmforge.config import ConfigError, FinetuneConfig, RunConfig, TrainConfig, save_config
from lmforge.data.tokenizer import tokenizer_digest
from lmforge.finetune.evaluate import load_chat_task, pair_logprobs, preference_report, score_chat_task, shard_bpb
from lmforge.finetune.pairs import load_pairs, read_pairs
from lmforge.finetune.setup import (
    DEFAULT_BETA,
    EMBEDDED_DIR,
    EMBEDDED_TASK,
    PAIRS_HELDOUT,
    PREFERENCE,
    build_job,
    check_chat_tokenizer,
    data_files,
    prepare_data,
)
from lmforge.train import lora
from lmforge.trained import TrainedModel, load_model

# The finetune fields named like train's replace them for the fine-tuning run; the other train options carry over.
TRAIN_KEYS = tuple(k for k in FinetuneConfig.model_fields if k in TrainConfig.model_fields)


def effective_train(cfg: RunConfig) -> TrainConfig:
    """``train`` with the fine-tuning run's own optimisation fields; no eval tasks during fine-tuning."""
    update = {k: getattr(cfg.finetune, k) for k in TRAIN_KEYS}
    return cfg.train.model_copy(update={**update, "tasks_every": 0, "early_stop_patience": 0})


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def require_quantization(cfg: RunConfig) -> None:
    """Refuse QLoRA, before anything is written, where its 4-bit kernels cannot run (no CUDA, no bitsandbytes)."""
    quantize = cfg.finetune.lora.quantize
    if quantize == "none":
        return
    if not torch.cuda.is_available() or cfg.train.device in ("cpu", "mps"):
        raise ConfigError(f"finetune.lora.quantize={quantize} needs a CUDA GPU (bitsandbytes 4-bit kernels) and "
                          f"this run has none (train.device={cfg.train.device}); use finetune.lora.quantize=none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"finetune.lora.quantize={quantize} needs bitsandbytes: pip install bitsandbytes") from None
    # The 4-bit training path itself (bitsandbytes NF4 base under PEFT's adapters) is not in this version:
    # it needs a GPU to be tested, and a setting that trains untested would be worse than a refusal.
    raise ConfigError(f"finetune.lora.quantize={quantize}: training on a 4-bit base is not available in this "
                      f"version of lmforge yet; use finetune.lora.quantize=none (LoRA on the full-precision base)")


def heldout_preferences(cfg: RunConfig, base: TrainedModel, tuned: TrainedModel, data_stats: dict,
                        data_dir: Path) -> dict:
    """Preference figures of both models on held-out pairs: finetune.heldout_task, else the embedded set's
    held-out pairs (no finetune.data), else the validation pairs."""
    ft = cfg.finetune
    source = ft.heldout_task or (None if ft.data else str(EMBEDDED_DIR / PAIRS_HELDOUT))
    if source:
        pairs, _ = read_pairs([source], base.tokenizer, ft.max_length or base.cfg.model.context, ft.on_bad_line)
    else:
        pairs = load_pairs(data_dir / "pairs_val.npz")
    bs = cfg.eval.batch_size
    report = preference_report(pair_logprobs(base.model, pairs, bs), pair_logprobs(tuned.model, pairs, bs),
                               ft.preference.beta or DEFAULT_BETA[ft.mode], [p.kind for p in pairs])
    return {"source": source or "validation pairs", **report}


def heldout_task(cfg: RunConfig) -> Path | None:
    """The multiple-choice chat task to score (a preference run's finetune.heldout_task holds pairs instead)."""
    ft = cfg.finetune
    if ft.mode in PREFERENCE:
        return None
    if ft.heldout_task:
        return Path(ft.heldout_task)
    return EMBEDDED_DIR / EMBEDDED_TASK if not ft.data and ft.mode == "chat" else None


def main(cfg: RunConfig, run_dir: Path, base_val: dict | None = None, stage: str = "finetune") -> dict:
    """Fine-tune into ``run_dir/<stage>``; returns the training summary and the before/after comparison.

    ``base_val``: the base model's validation figures when the caller has them already (the eval stage).
    """
    from lmforge.train import loop

    ft = cfg.finetune
    require_quantization(cfg)
    init = ft.init or str(run_dir)
    if ft.init is None and not (run_dir / "train").is_dir():
        raise ConfigError(f"finetune.init: no model to start from ({run_dir} has no pre-trained model); "
                          f"give one with --init PATH (a run, checkpoint, export or Hugging Face folder)")
    # A run named by --init means what it means to every verb, except this run itself: its own fine-tuned
    # model is what this stage writes, never where it starts (resuming would change the base).
    own = ft.init is None or Path(ft.init).expanduser().resolve() == run_dir.resolve()
    base = load_model(run_dir / "train" if own else ft.init)
    tok = base.tokenizer
    if ft.mode != "text":
        check_chat_tokenizer(tok)
    out = run_dir / stage
    out.mkdir(parents=True, exist_ok=True)
    if tok.vocab_size > base.cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer of {init} has {tok.vocab_size} tokens but the model's embedding only "
                          f"{base.cfg.model.vocab_size}: the tokenizer does not belong to this checkpoint")
    context = base.cfg.model.context
    max_length = ft.max_length or context
    if max_length > context:
        raise ConfigError(f"finetune.max_length ({max_length}) is longer than the model's context ({context})")
    tok_path = tok.save(out / "tokenizer")
    data_stats = prepare_data(cfg, tok, max_length, out / "data")
    train_files, val_files = data_files(ft)

    model_cfg = base.cfg.model.model_copy(update={"param_budget": None})
    run_cfg = cfg.model_copy(update={"model": model_cfg, "train": effective_train(cfg)})
    save_config(run_cfg, out / "config.yaml")
    # The finetune fields that invalidate its checkpoints; those named like train's count in run_cfg.train.
    shape = {k: v for k, v in artifacts.reuse_key(cfg, "finetune", resume=True)["finetune"].items()
             if k not in TRAIN_KEYS}
    # A model's own chat template and begin-token rule shape the data as much as its tokenizer.json does.
    template = {"chat_template": tok.chat_template, "add_bos": tok.add_bos} if tok.chat_template is not None else {}
    data_fp = artifacts.digest({"init": _weights_digest(base.model), "tokenizer": tokenizer_digest(tok_path),
                                "finetune": shape, "data": artifacts.content_digest([*train_files, *val_files]),
                                "max_length": max_length, **template})
    text = data_stats["mode"] == "text"
    # Chat has no bits per byte (only assistant tokens are scored); text is measured on its validation split.
    bpt = data_stats["val"]["bytes"] / max(1, data_stats["val"]["tokens"] - data_stats["val"]["docs"]) if text else None
    job = build_job(run_cfg, out, tok, tok_path, base.model.state_dict(), max_length,
                    lambda resolved: loop.train_fingerprint(resolved, data_fp), bpt)
    stats = loop.train(job)
    # Whether the conversations were packed (finetune.pack; "auto" decides from the data, in the loader).
    result = {"init": str(init), "base_step": base.step, "data": data_stats, "train": stats,
              "packed": bool(getattr(job.loader, "pack", False) or getattr(job.loader, "doc_ids", False))}
    if not stats["complete"]:
        return result
    tuned = load_model(out)  # the newest checkpoint, adapters merged
    if ft.lora.rank:
        result["adapter"] = [str(p) for p in _save_adapter(out, base, run_cfg)]
    result["compare"] = compare(cfg, run_dir, base, tuned, data_stats, base_val, out / "data")
    artifacts.write_json(out / "results.json", result)
    return result


def preference_stage(cfg: RunConfig, run_dir: Path) -> dict:
    """The ``dpo`` stage of ``lmforge run`` (``finetune.preference.stage``): preference tuning of the chat
    model the finetune stage made (or of the pre-trained one) into ``run_dir/dpo``."""
    p = cfg.finetune.preference
    start = run_dir / ("finetune" if cfg.finetune.enabled else "train")
    ft = cfg.finetune.model_copy(update={"mode": p.stage, "init": str(start), "data": list(p.data), "val": [],
                                         "steps": p.steps, "lr": p.lr, "heldout_task": None})
    return main(cfg.model_copy(update={"finetune": ft}), run_dir, stage="dpo")


def _save_adapter(out: Path, base: TrainedModel, run_cfg: RunConfig) -> list[Path]:
    """The adapters of the newest checkpoint alone, for loading onto the same base later."""
    from lmforge.models import build_model
    from lmforge.train import checkpoint

    ckpt = checkpoint.resolve(out)
    state = checkpoint.read_state(ckpt)
    model = build_model(run_cfg.model)
    lora.attach_from_state(model, state["lora"])
    checkpoint.load(ckpt, model, optimizer=None, restore_rng=False)
    info = {"base": {"path": str(base.path), "step": base.step, "weights": _weights_digest(base.model)},
            "model": run_cfg.model.model_dump(), "step": state["step"]}
    targets = state["lora"]["targets"]
    if lora.is_wrapped(model):  # PEFT's adapters, saved by PEFT, for the model's own Hugging Face folder
        return lora.save_peft(model, out / "adapter", str(base.path))
    files = lora.save_adapter(model, out / "adapter", run_cfg.finetune.lora, targets, info)
    if run_cfg.model.arch == "transformer":  # and in PEFT's format, for the model's Hugging Face export
        from lmforge.export.peft_adapter import save_peft_adapter

        try:
            files += save_peft_adapter(model, out / "adapter", run_cfg.finetune.lora, targets, str(base.path))
        except ConfigError as e:  # a Transformer with no Hugging Face export (qk_norm, ...)
            warnings.warn(f"the adapter is saved in lmforge's format only, not PEFT's: {e}", stacklevel=1)
    return files


def compare(cfg: RunConfig, run_dir: Path, base: TrainedModel, tuned: TrainedModel, data_stats: dict,
            base_val: dict | None, data_dir: Path) -> dict:
    """Held-out task accuracy and validation bits per byte of the base and the fine-tuned model."""
    context, bs = base.cfg.model.context, cfg.eval.batch_size
    out: dict = {}
    kw = dict(eot_id=base.tokenizer.eot_id, context=context, batch_size=bs, max_tokens=cfg.eval.max_tokens,
              stride=cfg.eval.stride)
    if cfg.finetune.mode in PREFERENCE:
        out["preference"] = heldout_preferences(cfg, base, tuned, data_stats, data_dir)
    task = heldout_task(cfg)
    if task is not None:
        items = load_chat_task(task)
        out["task"] = {"name": task.stem, "base": score_chat_task(base.model, base.tokenizer, context, items, bs),
                       "finetuned": score_chat_task(tuned.model, tuned.tokenizer, context, items, bs)}
    # The pre-training validation text: this run's, or that of the run the model came from.
    home = base.path.parents[2] if base.path.parent.name == "ckpt" else base.path  # RUN of RUN/<stage>/ckpt/step_N
    for pack in (run_dir / "pack", home / "pack"):
        manifest = artifacts.read_manifest(pack)
        if manifest:
            n_bytes = manifest["outputs"]["val"]["bytes"]
            before = base_val or shard_bpb(base.model, pack, n_bytes, **kw)
            out["pretrain_val"] = {"base": before, "finetuned": shard_bpb(tuned.model, pack, n_bytes, **kw)}
            break
    if data_stats["mode"] == "text":  # the domain's own held-out text
        n_bytes = data_stats["val"]["bytes"]
        out["finetune_val"] = {"base": shard_bpb(base.model, data_dir, n_bytes, **kw),
                               "finetuned": shard_bpb(tuned.model, data_dir, n_bytes, **kw)}
    return out

