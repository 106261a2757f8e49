"""Weights files: lmforge's safetensors writer and reader, tied tensors, and the check that a file fits a model.

Every weights file lmforge writes (checkpoints, the native and Hugging Face exports, LoRA and PEFT
adapters) goes through :func:`write_safetensors`; checkpoints add tied-tensor aliases
(:func:`save_weights`) and read them back (:func:`read_weights`) before :func:`check_compatible` says,
key by key, why a file does not fit a model. Folders, checksums and atomic renames are
:mod:`lmforge.train.checkpoint`'s::

    save_weights(model, Path("model.safetensors"))
    weights = read_weights(Path("model.safetensors"))   # aliases of tied tensors included
    check_compatible(weights, model, Path("model.safetensors"))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_TIED_KEY = "lmforge.tied"  # safetensors metadata: JSON {alias: stored name}


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or made for another model; the message names the path."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers, so keys carry no wrapper prefix."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _tie_groups(sd: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of state-dict entries that are the very same tensor (tied weights), each group sorted."""
    by_view: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        by_view.setdefault(key, []).append(name)
    return [sorted(names) for names in by_view.values() if len(names) > 1]


# safetensors' dtype names, in the order of its Dtype enum (its writer puts the later ones first)
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
           torch.int64: "I64"}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_DTYPES)}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, with ``open()``: every weights file lmforge writes.

    safetensors' own ``save_file`` is not used for writing: it creates the file through a temporary file
    of mode 0600, whatever the umask (since safetensors 0.8), and writes its metadata in hash order, so
    the same weights give different bytes from one save to the next. Here the file gets the mode the
    umask gives, like every other file, and its bytes depend only on the tensors and the metadata:
    tensors in safetensors' own order (by dtype, widest first, so each stays aligned, then by name) and
    metadata keys sorted: with one metadata key, the very bytes safetensors writes. Reading stays with
    safetensors (``safe_open``), which checks the header and every offset.
    """
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which lmforge does not write to safetensors")
    names = sorted(tensors, key=lambda n: (-_DTYPE_RANK[tensors[n].dtype], n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors' writer leaves it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:  # little-endian raw bytes, as safetensors stores them (every supported host is)
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """``model``'s weights (or a state dict) as one safetensors file (tied tensors once, aliases in the metadata)."""
    sd = dict(model) if isinstance(model, dict) else unwrap(model).state_dict()
    aliases = {}
    for group in _tie_groups(sd):
        for alias in group[1:]:  # store the tensor once under its first name
            aliases[alias] = group[0]
            del sd[alias]
    write_safetensors(sd, path, {"format": "pt", _TIED_KEY: json.dumps(aliases, sort_keys=True)})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every state-dict entry of the file, tied aliases included (sharing the stored tensor)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    for alias, stored in json.loads(meta.get(_TIED_KEY, "{}")).items():
        if stored in weights:
            weights.setdefault(alias, weights[stored])
    return weights


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_compatible(weights: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    untied = [g for g in _tie_groups(expected)
              if all(k in weights for k in g) and not all(torch.equal(weights[g[0]], weights[k]) for k in g[1:])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes, 3)}")
    if untied:
        problems.append(f"the model ties {_few([' = '.join(g) for g in untied], 2)} but the checkpoint holds "
                        f"different values for them (tie_embeddings differs)")
    if problems:
        raise CheckpointError(f"checkpoint {path} was made for a different model config: " + "; ".join(problems))
