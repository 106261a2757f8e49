"""Samples from a trained model: the ``sample`` stage and ``lmforge generate``.

Both go through the one generator, :class:`lmforge.serve.engine.Engine`::

    lmforge generate runs/demo --prompt "ROMEO:" --sample.temperature=0.7
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.config import RunConfig, SampleConfig
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import load_model


def params_from(sc: SampleConfig) -> SamplingParams:
    """The ``sample`` section as sampling parameters; generation stops at every end token of the model."""
    return SamplingParams(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                          top_p=sc.top_p, seed=sc.seed, stop=list(sc.stop))


def main(cfg: RunConfig, run_dir: Path) -> dict:
    """The sample stage: one completion per configured prompt, written to sample/samples.json."""
    tm = load_model(run_dir / "train")  # the pre-trained model, also in a run that has a fine-tuned one
    engine = Engine(tm.model, tm.tokenizer, device=None)
    params = params_from(cfg.sample)
    samples = []
    for prompt in cfg.sample.prompts:
        c = engine.generate([prompt], params)[0]
        samples.append({"prompt": prompt, "completion": c.text, "finish_reason": c.finish_reason,
                        "tokens": c.completion_tokens})
    out = run_dir / "sample"
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    return {"samples": samples, "step": tm.step}


def generate_cli(path: str, cfg: RunConfig) -> None:
    """Stream one completion per prompt to stdout as it is produced (``path``: anything ``load_model`` opens)."""
    tm = load_model(Path(path))
    engine = Engine(tm.model, tm.tokenizer, device=None)
    params = params_from(cfg.sample)
    for prompt in cfg.sample.prompts:
        sys.stdout.write(prompt)
        for delta in engine.stream(prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n\n")
