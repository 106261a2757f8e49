"""lm-evaluation-harness adapter: EleutherAI's ``lm-eval`` evaluates any lmforge model.

Importing this module registers the model type ``lmforge`` with lm-eval: an ``LM`` subclass whose
``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` run on a trained run or checkpoint
through :class:`~lmforge.eval.scoring.Scorer` and :class:`~lmforge.serve.engine.Engine` (greedy unless
the task asks to sample), so every registry architecture works. Needs the ``eval`` extra
(``pip install 'lmforge[eval]'``). Three ways in::

    lmforge harness runs/demo --eval.tasks=[speaker,minimal_pairs]     # lmforge tasks, scored by lm-eval
    python -m lmforge.eval.harness run --model lmforge --model_args pretrained=runs/demo \\
        --include_path my_tasks/ --tasks my_task                      # lm-eval's own CLI, our model added

    import lmforge.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/demo", tasks=[...])

lmforge task specs (:mod:`lmforge.eval.tasks`) are turned into lm-eval task YAMLs with absolute data
paths (lm-eval resolves relative ones against the working directory). Multiple-choice tasks give the
same ``acc``/``acc_norm``/``acc_bytes`` as lmforge's own scoring; generation tasks use lm-eval's
``exact_match`` (case and punctuation ignored, first answer only), which can differ from lmforge's
SQuAD-normalised score when answers contain articles. Runs offline: only local tasks load.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Fill lm-eval's model registry before adding ours: it only loads its built-in models while the
# registry is empty, so registering first would hide them.
import lm_eval.models  # noqa: F401
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import Task, load_task
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import TrainedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # datasets would otherwise ping the hub for local json files


@register_model("lmforge")
class LmforgeLM(LM):
    """An lmforge run or checkpoint as an lm-eval model (``--model_args pretrained=PATH[,batch_size=N]``)."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, batch_size: int | str = 16,
                 max_batch_size: int | None = None, max_gen_toks: int = 256,
                 trained: TrainedModel | None = None) -> None:
        super().__init__()
        if trained is None:
            if pretrained is None:
                raise ValueError("the lmforge model needs pretrained=<run folder or checkpoint>")
            from lmforge.trained import load_model

            trained = load_model(Path(pretrained), device=_pick_device(device))
        self.trained = trained
        # lm-eval passes batch_size="auto" (or "auto:N") when asked to choose; our batches are already length-sorted.
        size = int(batch_size) if str(batch_size).isdigit() else (max_batch_size or 16)
        self.scorer = Scorer(trained.model, trained.tokenizer, trained.cfg.model.context, batch_size=size)
        self.engine = Engine(trained.model, trained.tokenizer, device=None)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.engine.device

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(r.args) for r in requests]
        results = self.scorer.loglikelihood(args)
        for a, res in zip(args, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        results = self.scorer.rolling(texts)
        for t, res in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), res)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.trained.tokenizer
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            params = SamplingParams(max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                                    temperature=temperature if sample else 0.0, top_p=kwargs.pop("top_p", None),
                                    top_k=kwargs.pop("top_k", None), seed=kwargs.pop("seed", 1234), stop=until)
            # Like the tasks' own scoring, a prompt starts a new document.
            [completion] = self.engine.generate([tok.with_bos(tok.encode(context))], params)
            out.append(completion.text)
            self.cache_hook.add_partial("generate_until", r.args, completion.text)
        return out


def _pick_device(name: str | None):
    """lm-eval's command line asks for "cuda" by default; on a machine without it, use what there is."""
    import torch

    from lmforge.runtime import pick_device

    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        return pick_device("auto")
    return pick_device(name)


# ------------------------------------------------------------- task conversion
_MEAN = {"aggregation": "mean", "higher_is_better": True}


def task_config(task: Task, data_file: Path) -> dict:
    """The lm-eval task config (as written to YAML) for an lmforge task whose items are in ``data_file``."""
    cfg: dict = {"task": task.name, "dataset_path": "json",
                 "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
                 "test_split": "test", "metadata": {"version": 1.0}}
    if task.kind == "multiple_choice":
        # The choice is the exact continuation, as in lmforge's own scoring: no delimiter is added.
        cfg.update(output_type="multiple_choice", doc_to_text="context", doc_to_choice="choices",
                   doc_to_target="label", target_delimiter="",
                   metric_list=[{"metric": m, **_MEAN} for m in ("acc", "acc_norm", "acc_bytes")])
    else:
        cfg.update(output_type="generate_until", doc_to_text="prompt", doc_to_target="{{answers[0]}}",
                   target_delimiter="",
                   generation_kwargs={"until": list(task.stop), "max_gen_toks": task.max_new_tokens,
                                      "do_sample": False},
                   metric_list=[{"metric": "exact_match", **_MEAN, "ignore_case": True, "ignore_punctuation": True}])
        if task.answer_regex:
            cfg["filter_list"] = [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": task.answer_regex, "group_select": 0},
                {"function": "take_first"}]}]
    return cfg


def write_task(task: Task, out_dir: Path) -> Path:
    """Write ``out_dir/<name>.jsonl`` (the validated items) and ``out_dir/<name>.yaml``; return the YAML's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{task.name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in task.items), encoding="utf-8")
    path = out_dir / f"{task.name}.yaml"
    path.write_text(yaml.safe_dump(task_config(task, data), sort_keys=False), encoding="utf-8")
    return path


def evaluate(trained: TrainedModel, refs: list[str], work_dir: Path, limit: int | None = None,
             batch_size: int = 16, log_samples: bool = False) -> dict:
    """Run lmforge tasks ``refs`` through lm-eval's ``simple_evaluate``; returns its result dict
    (with ``log_samples``, also each item's requests and responses under ``"samples"``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [load_task(r) for r in refs]
    for t in tasks:
        write_task(t, work_dir)
    # include_defaults=False: index only our YAMLs, not lm-eval's thousands of built-in tasks.
    manager = TaskManager(include_path=str(Path(work_dir).resolve()), include_defaults=False)
    lm = LmforgeLM(trained=trained, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=[t.name for t in tasks], task_manager=manager, limit=limit,
                           bootstrap_iters=0, log_samples=log_samples)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, without its ``,filter`` suffixes and stderr entries."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def main(cfg, args: list[str]) -> dict:
    """``lmforge harness RUN``: score ``eval.tasks`` with lm-eval; writes ``RUN/harness/results.json``."""
    from lmforge.config import ConfigError

    if not cfg.eval.tasks:
        raise ConfigError("lmforge harness needs tasks: --eval.tasks=[speaker,minimal_pairs] or task files")
    from lmforge.trained import load_model

    run = Path(args[0] if args else cfg.run_dir)
    trained = load_model(run)  # a run folder means its fine-tuned model when it has one, as for serve and eval
    out_dir = (run if run.is_dir() and (run / "train").is_dir() else trained.path) / "harness"
    results = evaluate(trained, list(cfg.eval.tasks), out_dir / "tasks", batch_size=cfg.eval.batch_size)
    table = scores(results)
    (out_dir / "results.json").write_text(json.dumps({"checkpoint": str(trained.path), "step": trained.step,
                                                      "results": table}, indent=2))
    return table


if __name__ == "__main__":  # lm-eval's own command line, with the lmforge model type registered
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()
