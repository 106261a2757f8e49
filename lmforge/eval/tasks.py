"""Evaluation tasks from local files: multiple choice and question answering / generation, scored.

A task is a JSONL file of items, optionally described by a small YAML spec beside it. Two kinds:

- ``multiple_choice``: items ``{"context": str, "choices": [str, ...], "label": int}``. Each choice is
  scored by the summed log-likelihood of the choice given the context (:class:`~lmforge.eval.scoring.Scorer`);
  reported as ``acc`` (the most likely choice is the label), ``acc_norm`` (log-likelihood divided by
  the choice's length in characters, as lm-evaluation-harness's ``acc_norm``) and ``acc_bytes`` (divided
  by its UTF-8 bytes). The choice is the exact continuation: put a leading space in it if one belongs there.
- ``generate``: items ``{"prompt": str, "answers": [str, ...]}`` (or ``"answer": str``). The model
  continues the prompt greedily through :class:`~lmforge.serve.engine.Engine` until a ``stop`` string or
  ``max_new_tokens``; ``answer_regex`` (optional) picks the answer out of the completion (group 1 if
  the pattern has one, else the whole match). Reported as ``exact_match`` and token ``f1`` after
  SQuAD's normalisation (lowercase, no punctuation, no articles, single spaces), best over the answers.

A spec (YAML)::

    name: cloze                  # default: the file name
    kind: generate               # or multiple_choice
    data: cloze.jsonl            # relative to the YAML file (or `items:` inline, a list of records)
    description: next word of a famous line
    max_new_tokens: 8            # generate only
    stop: ["\\n"]
    answer_regex: "[A-Za-z']+"

A bare ``.jsonl`` file is a task too (its kind read from its first record). The tasks that ship with
lmforge (``lmforge/eval/task_files``) are named without a path: ``eval.tasks: [speaker, cloze, minimal_pairs]``.
They run in the eval stage of ``lmforge run`` and, with ``train.tasks_every``, during training::

    records = evaluate_tasks(model, tokenizer, context=256, refs=["speaker", "my_task.yaml"])
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from lmforge.config import ConfigError
from lmforge.data.sources import DataError
from lmforge.eval.scoring import Scorer

SHIPPED_DIR = Path(__file__).parent / "task_files"
KINDS = ("multiple_choice", "generate")
SPEC_KEYS = {"name", "kind", "data", "items", "description", "max_new_tokens", "stop", "answer_regex"}
METRICS = ("acc", "acc_norm", "acc_bytes", "exact_match", "f1")  # what a task result may report


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generate"]
    items: list[dict]
    source: str  # the file the items came from, for messages
    description: str = ""
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    answer_regex: str | None = None


# ------------------------------------------------------------------ loading
def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def load_task(ref: str) -> Task:
    """A task by shipped name, or from a ``.yaml`` spec or ``.jsonl`` file; bad input raises
    :class:`ConfigError` (no such task) or :class:`DataError` (naming file, line and field)."""
    path = Path(ref).expanduser()
    if not path.exists() and "/" not in ref and (SHIPPED_DIR / f"{ref}.yaml").is_file():
        path = SHIPPED_DIR / f"{ref}.yaml"
    if not path.is_file():
        raise ConfigError(f"eval.tasks: '{ref}' is neither a task shipped with lmforge "
                          f"({', '.join(shipped_tasks())}) nor a task file (.yaml or .jsonl)")
    if path.suffix in (".yaml", ".yml"):
        return _load_spec(path)
    if path.suffix == ".jsonl":
        items = _read_jsonl(path)
        kind = "multiple_choice" if "choices" in items[0][1] else "generate"
        return Task(path.stem, kind, _check_items(items, kind, str(path)), str(path))
    raise ConfigError(f"eval.tasks: '{ref}' must be a .yaml task spec or a .jsonl file of items")


def _load_spec(path: Path) -> Task:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a task spec must be a mapping (name, kind, data, ...)")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown field '{unknown[0]}' (known: {', '.join(sorted(SPEC_KEYS))})")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataError(f"{path}: field 'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    if ("data" in spec) == ("items" in spec):
        raise DataError(f"{path}: give exactly one of the fields 'data' (a .jsonl file) and 'items' (a list)")
    if "data" in spec:
        data = path.parent / str(spec["data"])
        if not data.is_file():
            raise DataError(f"{path}: field 'data': file not found: {data}")
        items, source = _read_jsonl(data), str(data)
    else:
        if not isinstance(spec["items"], list) or not spec["items"]:
            raise DataError(f"{path}: field 'items' must be a non-empty list of records")
        items, source = [(f"items[{i}]", it) for i, it in enumerate(spec["items"])], str(path)
    task = Task(str(spec.get("name") or path.stem), kind, _check_items(items, kind, source), source,
                description=str(spec.get("description") or ""))
    if kind == "generate":
        _apply_generation_options(task, spec, path)
    return task


def _apply_generation_options(task: Task, spec: dict, path: Path) -> None:
    n = spec.get("max_new_tokens", task.max_new_tokens)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"{path}: field 'max_new_tokens' must be an integer >= 1 (got {n!r})")
    stop = spec.get("stop", task.stop)
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise DataError(f"{path}: field 'stop' must be a list of non-empty strings (got {stop!r})")
    pattern = spec.get("answer_regex")
    if pattern is not None:
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise DataError(f"{path}: field 'answer_regex' is not a valid regular expression: {e}") from None
    task.max_new_tokens, task.stop, task.answer_regex = n, stop, None if pattern is None else str(pattern)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` per non-blank line; ``where`` is ``file:line``."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not items:
        raise DataError(f"{path}: the task has no items")
    return items


def _check_items(items: list[tuple[str, Any]], kind: str, source: str) -> list[dict]:
    return [_check_mc(where, r) if kind == "multiple_choice" else _check_gen(where, r) for where, r in items]


def _need(where: str, record: Any, name: str, ok: bool, expected: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: an item must be a JSON object (got {type(record).__name__})")
    if name not in record:
        raise DataError(f"{where}: missing field '{name}' ({expected})")
    if not ok:
        raise DataError(f"{where}: field '{name}' must be {expected} (got {record[name]!r:.60})")


def _check_mc(where: str, r: Any) -> dict:
    _need(where, r, "context", isinstance(r.get("context") if isinstance(r, dict) else None, str), "a string")
    choices = r.get("choices")
    _need(where, r, "choices", isinstance(choices, list) and len(choices) >= 2
          and all(isinstance(c, str) and c for c in choices), "a list of at least 2 non-empty strings")
    label = r.get("label")
    _need(where, r, "label", isinstance(label, int) and not isinstance(label, bool), "an integer choice index")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: field 'label' is {label}, out of range for {len(choices)} choices "
                        f"(0..{len(choices) - 1})")
    return {"id": r.get("id", where.rsplit(":", 1)[-1]), "context": r["context"], "choices": choices, "label": label}


def _check_gen(where: str, r: Any) -> dict:
    _need(where, r, "prompt", isinstance(r.get("prompt") if isinstance(r, dict) else None, str), "a string")
    if "answers" not in r and isinstance(r.get("answer"), str):
        r = {**r, "answers": [r["answer"]]}
    answers = r.get("answers")
    _need(where, r, "answers", isinstance(answers, list) and bool(answers) and all(isinstance(a, str) for a in answers),
          "a non-empty list of strings (or 'answer': a string)")
    return {"id": r.get("id", where.rsplit(":", 1)[-1]), "prompt": r["prompt"], "answers": answers}


# ------------------------------------------------------------------ answers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (1.0 if both are empty)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def extract_answer(completion: str, pattern: str | None) -> str:
    if pattern is None:
        return completion.strip()
    m = re.search(pattern, completion)
    if m is None:
        return ""
    return m.group(1) if m.re.groups else m.group(0)


# ------------------------------------------------------------------ scoring
def score_multiple_choice(task: Task, scorer: Scorer) -> tuple[dict, list[dict]]:
    """``(result, per-item details)``; one log-likelihood request per (item, choice)."""
    pairs = [(it["context"], ch) for it in task.items for ch in it["choices"]]
    scores = iter(scorer.loglikelihood(pairs))
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    details = []
    for it in task.items:
        lls = np.array([next(scores)[0] for _ in it["choices"]])
        chars = np.array([len(c) for c in it["choices"]], dtype=float)
        n_bytes = np.array([len(c.encode("utf-8")) for c in it["choices"]], dtype=float)
        # np.argmax takes the first of equal scores, as lm-evaluation-harness does.
        preds = {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / chars)),
                 "acc_bytes": int(np.argmax(lls / n_bytes))}
        for k, p in preds.items():
            hits[k] += p == it["label"]
        details.append({"id": it["id"], "label": it["label"], "pred": preds["acc"], "pred_norm": preds["acc_norm"],
                        "loglikelihoods": [round(float(x), 6) for x in lls]})
    n = len(task.items)
    result = {k: v / n for k, v in hits.items()}
    result["chance"] = float(np.mean([1.0 / len(it["choices"]) for it in task.items]))
    return result, details


def score_generation(task: Task, engine) -> tuple[dict, list[dict]]:
    """Greedy completions through the engine; exact match and F1, best over each item's answers."""
    from lmforge.serve.engine import SamplingParams

    params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=list(task.stop))
    tok = engine.tokenizer
    prompts = [tok.with_bos(tok.encode(it["prompt"])) for it in task.items]  # a new document each
    completions = engine.generate(prompts, params)
    em = f1 = 0.0
    details = []
    for it, c in zip(task.items, completions, strict=True):
        answer = extract_answer(c.text, task.answer_regex)
        item_em = max(exact_match(answer, a) for a in it["answers"])
        item_f1 = max(token_f1(answer, a) for a in it["answers"])
        em, f1 = em + item_em, f1 + item_f1
        details.append({"id": it["id"], "completion": c.text, "answer": answer, "exact_match": item_em,
                        "f1": round(item_f1, 6)})
    n = len(task.items)
    return {"exact_match": em / n, "f1": f1 / n}, details


def run_task(task: Task, model, tokenizer, context: int, batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Score one task: ``({"task", "kind", "items", metrics...}, per-item details)``."""
    if task.kind == "multiple_choice":
        metrics, details = score_multiple_choice(task, Scorer(model, tokenizer, context, batch_size))
    else:
        from lmforge.serve.engine import Engine

        metrics, details = score_generation(task, Engine(model, tokenizer, device=None))
    return {"task": task.name, "kind": task.kind, "items": len(task.items), **metrics}, details


def evaluate_tasks(model, tokenizer, context: int, refs: Sequence[str], out_dir: Path | None = None,
                   batch_size: int = 16, tasks: Sequence[Task] | None = None) -> list[dict]:
    """Run every task of ``refs`` (or the already loaded ``tasks``); one result record per task.

    With ``out_dir``, each task's per-item details go to ``out_dir/<task>.jsonl`` for inspection.
    The model's train/eval mode is restored afterwards.
    """
    tasks = list(tasks) if tasks is not None else [load_task(r) for r in refs]
    was_training = model.training
    model.eval()
    records = []
    try:
        for task in tasks:
            record, details = run_task(task, model, tokenizer, context, batch_size)
            records.append(record)
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                lines = "".join(json.dumps(d) + "\n" for d in details)
                (Path(out_dir) / f"{task.name}.jsonl").write_text(lines, encoding="utf-8")
    finally:
        model.train(was_training)
    return records


class TaskProbe:
    """Runs the eval tasks every ``every`` training steps and logs their scores as metrics of kind ``tasks``.

    The tasks are loaded (and checked) when the probe is built, even with ``every`` 0: a bad task file
    stops a run before it trains, not at the eval stage after it. The caller hands it to
    :func:`lmforge.train.loop.main` (``probe=``), which runs it on the main rank only.
    """

    def __init__(self, refs: Sequence[str], every: int, tokenizer, context: int) -> None:
        self.every = every
        self.tasks = [load_task(r) for r in refs]
        self.tokenizer, self.context = tokenizer, context

    def maybe_run(self, step: int, model, logger) -> None:
        if not (self.tasks and self.every) or step % self.every:
            return
        records = evaluate_tasks(model, self.tokenizer, self.context, [], tasks=self.tasks)
        logger.log(step, "tasks", {f"{r['task']}.{m}": r[m] for r in records for m in METRICS if m in r})
