"""LoRA for every registry model: attach low-rank adapters, merge them, save and load them alone.

An adapter adds ``(alpha / r) * B @ A`` to a frozen weight ``W`` (``A`` is ``r x in``, drawn at random;
``B`` is ``out x r``, zeros, so a fresh adapter changes nothing). Covered modules:

- ``nn.Linear`` (every Transformer projection, the CNN's output projections, the RNN's width
  projections): ``base(x) + scale * B(A(dropout(x)))``;
- ``nn.Conv1d`` (the gated CNN's causal convolution): ``A`` is a convolution with the base's kernel,
  dilation and stride into ``r`` channels, ``B`` a 1x1 convolution back, so ``B @ A`` is a kernel;
- ``nn.LSTM`` / ``nn.GRU``: every ``weight_ih_l*`` and ``weight_hh_l*`` matrix gets its own ``B @ A``,
  added to the weight before the fused kernel runs (no dropout there: it would have to act on the
  recurrent input inside the kernel).

Embeddings and the output head are not adapted by default (a head tied to the embedding would be
adapted on one side only). lmforge uses its own small LoRA for its own architectures because they are
plain ``nn.Module``s with recurrent layers peft does not cover, and the merged model must keep the exact
parameter names the checkpoint, export and serving code expect (the Transformer's adapters are also
written in PEFT's format, :mod:`lmforge.export.peft_adapter`). A model wrapped from Hugging Face
(``model.arch=hf``) gets PEFT's own LoRA instead (``get_peft_model`` on its transformers module, the same
options; merged with ``merge_and_unload``, saved with ``save_pretrained``): the same functions below
dispatch to it. It lives with training,
like the other things applied to a model from outside (DDP, FSDP, compile in :mod:`lmforge.train.distributed`),
because fine-tuning attaches adapters and :func:`lmforge.trained.load_model` merges them, and the loader
must not import the fine-tuning stage that itself loads models::

    names = attach_lora(model, LoraConfig(rank=8, targets=["q", "v"]))   # base frozen, adapters trainable
    save_adapter(model, Path("adapter"), cfg)                             # adapter.safetensors + adapter.json
    merge_lora(model)                                                     # plain model again, W += scale B@A
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from lmforge.config import ConfigError, LoraConfig
from lmforge.train.weights import CheckpointError, write_safetensors

ADAPTER_FILE, ADAPTER_JSON, FORMAT = "adapter.safetensors", "adapter.json", "lmforge-lora"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)(?:\.|$)")
_RNN_LAYER_RE = re.compile(r"_l(\d+)(?:_reverse)?$")


def layer_of(name: str) -> int | None:
    """The block index a parameter or module name belongs to (``layers.3.attn.q`` -> 3), or None."""
    m = _LAYER_RE.search(name) or _RNN_LAYER_RE.search(name)
    return int(m.group(1)) if m else None


class _LoRA(nn.Module):
    """Shared part: the frozen ``base`` module, the scale and the dropout."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _a(rows: int, cols: int, like: Tensor) -> nn.Parameter:
        a = torch.empty(rows, cols, device=like.device, dtype=like.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the usual LoRA init of A, as nn.Linear's
        return nn.Parameter(a)

    @staticmethod
    def _b(rows: int, cols: int, like: Tensor) -> nn.Parameter:
        return nn.Parameter(torch.zeros(rows, cols, device=like.device, dtype=like.dtype))


class LoRALinear(_LoRA):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.lora_A = self._a(rank, base.in_features, base.weight)  # (r, in)
        self.lora_B = self._b(base.out_features, rank, base.weight)  # (out, r)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Module:
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


class LoRAConv1d(_LoRA):
    def __init__(self, base: nn.Conv1d, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank, alpha, dropout)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ConfigError("LoRA supports Conv1d with groups=1 and zero padding only")
        k = base.kernel_size[0]
        self.lora_A = self._a(rank, base.in_channels * k, base.weight)  # (r, in * k)
        self.lora_B = self._b(base.out_channels, rank, base.weight)  # (out, r)

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        a = self.lora_A.view(self.rank, b.in_channels, b.kernel_size[0])  # (r, in, k)
        h = F.conv1d(self.drop(x), a, None, b.stride, b.padding, b.dilation)  # (B, r, T)
        return b(x) + F.conv1d(h, self.lora_B[:, :, None]) * self.scale

    def merged(self) -> nn.Module:
        with torch.no_grad():
            self.base.weight += ((self.lora_B @ self.lora_A) * self.scale).view_as(self.base.weight)
        return self.base


class LoRARNN(_LoRA):
    """Adapters on every input-to-hidden and hidden-to-hidden matrix of an ``nn.LSTM`` / ``nn.GRU``."""

    def __init__(self, base: nn.RNNBase, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank, alpha, 0.0)
        self.names = [n for n, _ in base.named_parameters() if n.startswith("weight_")]
        for n in self.names:
            w = getattr(base, n)
            self.register_parameter(f"lora_A_{n}", self._a(rank, w.shape[1], w))
            self.register_parameter(f"lora_B_{n}", self._b(w.shape[0], rank, w))

    def _delta(self, n: str) -> Tensor:
        return (getattr(self, f"lora_B_{n}") @ getattr(self, f"lora_A_{n}")) * self.scale

    def forward(self, *args, **kwargs):
        weights = {n: getattr(self.base, n) + self._delta(n) for n in self.names}
        return functional_call(self.base, weights, args, kwargs)

    def merged(self) -> nn.Module:
        with torch.no_grad():
            for n in self.names:
                getattr(self.base, n).add_(self._delta(n))
        return self.base


def _wrapper(module: nn.Module) -> type[_LoRA] | None:
    if isinstance(module, nn.Linear):
        return LoRALinear
    if isinstance(module, nn.Conv1d):
        return LoRAConv1d
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return LoRARNN
    return None


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def adaptable(model: nn.Module) -> list[str]:
    """Names of the modules LoRA can adapt, output head excluded."""
    return [n for n, m in model.named_modules() if _wrapper(m) is not None and n != "lm_head"]


def select_targets(model: nn.Module, cfg: LoraConfig, last_layers: int | None = None) -> list[str]:
    """The module names ``cfg.targets`` picks (all adaptable ones when empty), optionally only in the
    last ``last_layers`` blocks; raises :class:`ConfigError` when a pattern matches nothing."""
    candidates = [n for n, m in model.named_modules() if _wrapper(m) is not None]
    chosen: list[str] = []
    if not cfg.targets:
        chosen = adaptable(model)
    for pattern in cfg.targets:
        hits = [n for n in candidates if _matches(n, pattern)]
        if not hits:
            raise ConfigError(f"finetune.lora.targets: '{pattern}' matches no Linear, Conv1d, LSTM or GRU module; "
                              f"adaptable modules: {', '.join(adaptable(model)[:12])}")
        chosen += [n for n in hits if n not in chosen]
    if last_layers is not None:
        n_layers = model.cfg.n_layers
        chosen = [n for n in chosen if (layer_of(n) is not None and layer_of(n) >= n_layers - last_layers)
                  or isinstance(model.get_submodule(n), nn.RNNBase)]
    if not chosen:
        raise ConfigError("finetune.lora: no module left to adapt (check finetune.lora.targets and train_layers)")
    return chosen


def attach_lora(model: nn.Module, cfg: LoraConfig, last_layers: int | None = None) -> list[str]:
    """Freeze every base parameter and wrap the target modules with adapters; returns their names."""
    if cfg.rank < 1:
        raise ConfigError("finetune.lora.rank must be at least 1 to attach adapters")
    if is_wrapped(model):
        return _attach_peft(model, cfg, last_layers)
    names = select_targets(model, cfg, last_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, _wrapper(base)(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, _LoRA) for m in model.modules()) or (is_wrapped(model) and _is_peft(model.hf))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, inside the block: every adapter's scale is 0, so ``base(x) + 0`` is exactly
    ``base(x)`` (the DPO reference of a LoRA run, without a second copy of the weights). A wrapped model's
    PEFT adapters are switched off by PEFT itself (``disable_adapter``)."""
    if is_wrapped(model) and _is_peft(model.hf):
        with model.hf.disable_adapter():
            yield model
        return
    adapters = [m for m in model.modules() if isinstance(m, _LoRA)]
    scales = [m.scale for m in adapters]
    for m in adapters:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(adapters, scales, strict=True):
            m.scale = scale


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain module back (names as before LoRA)."""
    if is_wrapped(model) and _is_peft(model.hf):
        model.hf = model.hf.merge_and_unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, _LoRA):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------ models wrapped from Hugging Face: PEFT
def is_wrapped(model: nn.Module) -> bool:
    """A transformers model behind lmforge's contract (``model.arch=hf``), adapted through PEFT."""
    return getattr(getattr(model, "cfg", None), "arch", None) == "hf"


def _is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def _attach_peft(model: nn.Module, cfg: LoraConfig, last_layers: int | None) -> list[str]:
    """``get_peft_model`` on the wrapped transformers module (``model.hf``), with lmforge's target rules:
    names or patterns of Linear modules (all but the output head when empty), in the last ``last_layers``."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("finetune.lora on a model wrapped from Hugging Face trains PEFT's adapters: "
                          "pip install peft (or lmforge[hf])") from None
    head = model.lm_head
    candidates = [n for n, m in model.hf.named_modules() if isinstance(m, nn.Linear) and m is not head]
    chosen = [n for n in candidates if not cfg.targets or any(_matches(n, p) for p in cfg.targets)]
    for pattern in cfg.targets:
        if not any(_matches(n, pattern) for n in candidates):
            raise ConfigError(f"finetune.lora.targets: '{pattern}' matches no Linear module of the model; "
                              f"its modules are named like {', '.join(candidates[:8])}")
    if last_layers is not None:
        chosen = [n for n in chosen if layer_of(n) is not None and layer_of(n) >= model.cfg.n_layers - last_layers]
    if not chosen:
        raise ConfigError("finetune.lora: no module left to adapt (check finetune.lora.targets and train_layers)")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=chosen,
                              bias="none", task_type="CAUSAL_LM")
    model.hf = get_peft_model(model.hf, peft_cfg)  # freezes the base weights; adapters A random, B zero
    return chosen


def save_peft(model: nn.Module, folder: Path, base: str) -> list[Path]:
    """The PEFT adapters of a wrapped model, with ``save_pretrained`` (adapter_config.json + adapter_model.safetensors)."""
    model.hf.peft_config["default"].base_model_name_or_path = base
    model.hf.save_pretrained(str(folder))
    return [folder / "adapter_config.json", folder / "adapter_model.safetensors"]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, by their names in the model."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapter(model: nn.Module, folder: Path, cfg: LoraConfig, targets: list[str], info: dict) -> list[Path]:
    """``adapter.safetensors`` (the adapter tensors alone) and ``adapter.json`` (options, targets, base)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(adapter_state(model), folder / ADAPTER_FILE, metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": 1, "lora": cfg.model_dump(), "targets": targets, **info}
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return [folder / ADAPTER_FILE, folder / ADAPTER_JSON]


def load_adapter(model: nn.Module, folder: Path) -> dict:
    """Attach the adapters saved in ``folder`` to ``model`` (a base of the same config) and load them."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / ADAPTER_JSON} is not a readable adapter description ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / ADAPTER_JSON}: format {meta.get('format')!r} is not {FORMAT!r}")
    cfg = LoraConfig.model_validate(meta["lora"])
    attach_lora(model, cfg.model_copy(update={"targets": meta["targets"]}))
    tensors = load_file(str(folder / ADAPTER_FILE))
    expected = adapter_state(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors):
        raise CheckpointError(f"{folder / ADAPTER_FILE} does not fit this base model "
                              f"(adapter tensors {len(tensors)}, model expects {len(expected)} of other shapes)")
    model.load_state_dict(tensors, strict=False)
    return meta


def attach_from_state(model: nn.Module, info: dict) -> None:
    """Re-create the adapters a fine-tuning checkpoint recorded (its state's ``lora`` entry)."""
    cfg = LoraConfig.model_validate(info["config"])
    attach_lora(model, cfg.model_copy(update={"targets": list(info["targets"])}))
