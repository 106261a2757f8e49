"""``lmforge export RUN --format hf|gguf|lmforge [--out PATH]``: a trained model in other tools' formats.

- ``hf``: a Hugging Face folder that ``transformers`` loads with no custom code (:mod:`.hf`);
- ``gguf``: one file for llama.cpp-family runtimes (:mod:`.gguf`), f32, f16 or Q8_0;
- ``lmforge``: safetensors + config + tokenizer for any architecture (:mod:`.native`).

HF and GGUF hold the Llama-compatible Transformer only. With ``export.check`` (on by
default) the export is loaded back and its logits compared with lmforge's; the
command fails (exit 1) when they differ. Examples::

    lmforge export runs/demo --format hf --out exported/demo-hf
    lmforge export runs/demo --format gguf --out exported/demo.gguf --export.gguf_type=q8_0
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.trained import TrainedModel


def export(tm: TrainedModel, fmt: str, out: Path, gguf_type: str = "f32", check: bool = True) -> dict:
    """Write ``tm`` in format ``fmt`` to ``out``; returns the files and the check's figures."""
    result: dict = {"format": fmt, "out": str(out)}
    if fmt == "hf":
        from lmforge.export.hf import check_hf, export_hf

        files = export_hf(tm, out)
        if check:
            result["check"] = check_hf(tm, out)
    elif fmt == "gguf":
        from lmforge.export.gguf import export_gguf
        from lmforge.export.gguf_check import check_gguf

        files = export_gguf(tm, out, gguf_type)
        result["gguf_type"] = gguf_type
        if check:
            result["check"] = check_gguf(tm, out, gguf_type)
    else:
        from lmforge.export.native import export_native
        from lmforge.trained.native import load_native

        files = export_native(tm, out)
        if check:
            import torch

            back = load_native(out)
            idx = torch.randint(0, tm.cfg.model.vocab_size, (1, min(tm.cfg.model.context, 32)),
                                generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = float((back.model(idx)[0] - tm.model.cpu().eval()(idx)[0]).abs().max())
            result["check"] = {"max_logit_diff": diff}
    result["files"] = {f.name: f.stat().st_size for f in files}
    return result


def main(cfg: RunConfig, args: list[str]) -> dict:
    """The ``export`` verb: PATH (run, checkpoint) -> ``export.out`` (default RUN/export/FORMAT)."""
    ec = cfg.export
    source = Path(args[0]) if args else cfg.run_dir
    from lmforge.trained import load_model

    tm = load_model(source)  # a run, checkpoint, export or Hugging Face folder
    # A checkpoint folder's export goes beside it (the ckpt folder ignores names other than step_N).
    base = source.parent if (source / "checksums.json").is_file() else source
    default = base / "export" / ("model.gguf" if ec.format == "gguf" else ec.format)
    out = Path(ec.out) if ec.out else default
    result = export(tm, ec.format, out, ec.gguf_type, ec.check)
    print(json.dumps(result, indent=2))
    return result
