"""``lmforge compare RUN [RUN ...]``: finished runs side by side.

Reads each run folder (``config.yaml``, ``summary.json``, ``train/metrics.jsonl`` and the train,
eval and pack manifests) and writes, to ``--out`` (default ``RUNS_DIR/compare/``):

- ``compare.md``: the config keys whose values differ between the runs (nothing else of the
  config), then the results: final training and validation loss, validation bits per byte and the
  gap to the best, next-token accuracy, every task's scores, training tokens, time, tokens/s,
  parameters and steps; one column per run;
- ``compare.png``: overlaid curves, one colour per run: training loss, validation loss, and
  validation bits per byte against step and against training tokens;
- ``compare.html``: the same as one self-contained page (the figure embedded);
- ``compare.json``: every figure, for scripts.

A RUN is a run folder (``runs/lr-1e-3``) or a run name under ``runs_dir``. A folder without
``config.yaml`` is not a run; a run without ``train/metrics.jsonl`` has nothing to compare yet:
both are errors that name the folder. A run trained but not yet evaluated (no ``summary.json``)
is shown with its last in-training estimates, and the page says so::

    lmforge compare runs/lr-1e-3 runs/lr-3e-3 --out runs/compare-lr
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import ConfigError, RunConfig
from lmforge.data.sources import DataError
from lmforge.report.bakeoff import rank
from lmforge.report.plots import overlaid_curves, points
from lmforge.report.render import Heading, Image, Para, Table, flatten, fmt, to_html, to_markdown, write_images
from lmforge.train.metrics import METRICS_FILE, read_metrics

IGNORED_KEYS = {"name", "runs_dir"}  # differ between any two runs, shape nothing
RESULTS = [  # (key, label) of the results table, tasks inserted after val_acc
    ("train_loss", "final training loss (nats/token)"), ("val_loss", "final validation loss (nats/token)"),
    ("val_bpb", "validation bits per byte"), ("vs_best", "vs best (bits per byte)"),
    ("val_acc", "next-token accuracy"), ("tokens_seen", "training tokens"), ("train_seconds", "training time"),
    ("tokens_per_s", "training tokens/s"), ("params", "parameters"), ("steps", "steps (stopped by)"),
]
_TASK_KEYS = {"multiple_choice": ("acc", "acc_norm"), "generate": ("exact_match", "f1")}


@dataclass
class RunRecord:
    label: str
    path: Path
    config: dict[str, Any]  # flat: dotted key -> value
    metrics: list[dict]
    summary: dict = field(default_factory=dict)  # empty: not evaluated yet
    train: dict = field(default_factory=dict)  # the train stage's outputs
    tasks: list[dict] = field(default_factory=list)
    val_bytes: int | None = None


# ------------------------------------------------------------------ reading
def resolve(arg: str, runs_dir: str) -> Path:
    """A run folder given as a path, or as a run name under ``runs_dir``."""
    path = Path(arg).expanduser()
    if not path.is_dir() and (Path(runs_dir) / arg).is_dir():
        path = Path(runs_dir) / arg
    if not path.is_dir():
        raise ConfigError(f"lmforge compare: no run folder '{arg}' (nor {Path(runs_dir) / arg})")
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON ({e})") from None


def _outputs(manifest: Path) -> dict:
    return _json(manifest).get("outputs", {}) if manifest.is_file() else {}


def load_run(path: Path) -> RunRecord:
    """The config, metrics and results of one run folder; bad folders raise a message naming them."""
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not an lmforge run: it has no config.yaml (a run folder is RUNS_DIR/NAME, "
                          f"written by lmforge run or lmforge train)")
    try:
        tree = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    metrics_file = path / "train" / METRICS_FILE
    if not metrics_file.is_file():
        raise ConfigError(f"{path} has no training metrics ({metrics_file} is missing): train it first, "
                          f"e.g. lmforge run --config {path / 'config.yaml'}")
    try:
        metrics = read_metrics(metrics_file)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not points(metrics, "train", "loss") and not points(metrics, "val", "loss"):
        raise ConfigError(f"{path} has no training metrics: {metrics_file} holds no loss measurement yet")
    summary = _json(path / "summary.json") if (path / "summary.json").is_file() else {}
    pack = _outputs(path / "pack" / "manifest.json")
    return RunRecord(path.name, path, dict(flatten(tree)), metrics, summary, _outputs(path / "train" / "manifest.json"),
                     _outputs(path / "eval" / "manifest.json").get("tasks") or [], pack.get("val", {}).get("bytes"))


def differences(records: list[RunRecord]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run, in config order."""
    keys = list(dict.fromkeys(k for r in records for k in r.config if k not in IGNORED_KEYS))
    # A key one run lacks (a field added to lmforge after it ran) counts as None, its usual default.
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True, default=repr) for r in records}) > 1]


def _last(metrics: list[dict], kind: str, key: str) -> float | None:
    pts = points(metrics, kind, key)
    return pts[-1][1] if pts else None


def results(r: RunRecord) -> dict[str, Any]:
    """The final figures of one run: the eval stage's when it ran, else the last in-training estimates."""
    s, t = r.summary, r.train

    def pick(key: str, fallback: Any = None) -> Any:
        return s.get(key, t.get(key, fallback))

    last_train = next((m for m in reversed(r.metrics) if m.get("kind") == "train"), {})
    out = {
        "train_loss": s.get("train_loss", _last(r.metrics, "train", "loss")),
        "val_loss": s.get("val_loss", _last(r.metrics, "val", "loss")),
        "val_bpb": s.get("val_bpb", _last(r.metrics, "val", "bpb")),
        "val_acc": s.get("val_acc", _last(r.metrics, "val", "acc")),
        "tokens_seen": pick("tokens_seen", last_train.get("tokens")),
        "train_seconds": pick("train_seconds", last_train.get("seconds")),
        "tokens_per_s": pick("tokens_per_s"),
        "params": pick("params"),
        "steps": pick("steps", last_train.get("step")),
        "stopped_by": pick("stopped_by"),
    }
    for stage in ("finetune", "dpo"):  # fine-tuning's before/after figures, preferences included
        for key, value in (s.get(stage) or {}).items():
            out[f"{stage}.{key}"] = value
    if out["tokens_per_s"] is None and out["tokens_seen"] and out["train_seconds"]:
        out["tokens_per_s"] = out["tokens_seen"] / out["train_seconds"]
    for task in r.tasks:
        for metric in _TASK_KEYS.get(task.get("kind"), ()):
            if metric in task:
                out[f"{task['task']}.{metric}"] = task[metric]
    return out


# ------------------------------------------------------------------ the report
def _label(records: list[RunRecord]) -> None:
    """Runs are named by folder; folders of the same name by parent/name, else by their whole path."""
    for name_of in (lambda p: p.name, lambda p: f"{p.parent.name}/{p.name}", str):
        labels = [name_of(r.path) for r in records]
        if len(set(labels)) == len(labels):
            break
    for r, label in zip(records, labels, strict=True):
        r.label = label


def _config_value(value: Any) -> str:
    """A config value as one would write it in a recipe: 0.003, cosine, true, null, [a, b]."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def _cell(res: dict, key: str) -> str:
    if key == "steps":
        by = res.get("stopped_by")
        return fmt(res.get("steps"), "steps") + (f" ({by})" if by else "")
    value = res.get(key)
    return value if isinstance(value, str) else fmt(value, key)


def compare(records: list[RunRecord]) -> dict:
    """The comparison as data: differing config keys, and per run its config values and results."""
    _label(records)
    diff = differences(records)
    res = {r.label: results(r) for r in records}
    if all(isinstance(v["val_bpb"], (int, float)) for v in res.values()):
        for row in rank([{"label": k, "val_bpb": v["val_bpb"]} for k, v in res.items()]):
            res[row["label"]]["vs_best"] = row["vs_best"]
    best = min(res, key=lambda k: res[k]["val_bpb"]) if all("vs_best" in v for v in res.values()) else None
    return {"differences": diff, "best": best, "runs": [
        {"label": r.label, "path": str(r.path), "final_evaluation": bool(r.summary), "val_bytes": r.val_bytes,
         "config": {k: r.config.get(k) for k in diff}, "results": res[r.label]} for r in records]}


def _blocks(result: dict, figure: bytes) -> list:
    runs, labels = result["runs"], [r["label"] for r in result["runs"]]
    blocks: list = [Heading(1, f"Comparison of {len(runs)} runs: {', '.join(labels)}"), Heading(2, "Config differences")]
    if result["differences"]:
        blocks.append(Table(["config key", *labels], [[k, *(_config_value(r["config"].get(k)) for r in runs)]
                                                       for k in result["differences"]]))
    else:
        blocks.append(Para("The configs are identical apart from the run names."))
    task_keys = list(dict.fromkeys(k for r in runs for k in r["results"] if "." in k))
    keys = [k for k, _ in RESULTS]
    keys[keys.index("val_acc") + 1:keys.index("val_acc") + 1] = task_keys
    labels_of = dict(RESULTS) | {k: f"task {k}" for k in task_keys}
    shown = [k for k in keys if any(r["results"].get(k) is not None for r in runs)]
    blocks += [Heading(2, "Results"),
               Table(["", *labels], [[labels_of[k], *(_cell(r["results"], k) for r in runs)] for k in shown])]
    notes = []
    if result["best"]:
        notes.append(f"Best validation bits per byte: {result['best']}.")
    unevaluated = [r["label"] for r in runs if not r["final_evaluation"]]
    if unevaluated:
        notes.append(f"Not evaluated yet (no summary.json): {', '.join(unevaluated)}; their figures are the last "
                     "in-training estimates on a few validation batches.")
    if len({r["val_bytes"] for r in runs if r["val_bytes"] is not None}) > 1:
        notes.append("The runs were validated on different text (validation bytes: "
                     + ", ".join(f"{r['label']} {fmt(r['val_bytes'])}" for r in runs) +
                     "): bits per byte are comparable across tokenizers, not across validation sets.")
    notes.append("Losses and bits per byte are the eval stage's scores over the whole validation text and an "
                 "equally long training slice; task scores are fractions of items right (acc, acc_norm, "
                 "exact_match) or mean token F1.")
    blocks += [Para(n) for n in notes]
    blocks += [Heading(2, "Curves"), Image("compare.png", "training and validation curves of every run", figure),
               Heading(2, "Runs"), Table(["run", "folder"], [[r["label"], r["path"]] for r in runs])]
    return blocks


def write_compare(out_dir: Path, records: list[RunRecord]) -> dict:
    """Write compare.md, .html, .png and .json into ``out_dir``; returns the comparison with its ``files``."""
    result = compare(records)
    figure = overlaid_curves({r.label: r.metrics for r in records},
                             {r["label"]: r["results"]["val_bpb"] for r in result["runs"]},
                             f"{len(records)} runs: {', '.join(r.label for r in records)}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"compare.out: cannot create the folder {out_dir}: {e.strerror}") from None
    blocks = _blocks(result, figure)
    paths = {"png": write_images(blocks, out_dir)["compare.png"], "md": out_dir / "compare.md",
             "html": out_dir / "compare.html", "json": out_dir / "compare.json"}
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(to_html(blocks, title=blocks[0].text), encoding="utf-8")
    result["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


def main(cfg: RunConfig, args: list[str]) -> dict:
    """``lmforge compare RUN [RUN ...]``: load every run (all checked before anything is written), then write."""
    if not args:
        raise ConfigError("lmforge compare needs one or more run folders, e.g. lmforge compare runs/a runs/b")
    paths = [resolve(a, cfg.runs_dir) for a in args]
    seen: set[Path] = set()
    for arg, p in zip(args, paths, strict=True):
        if p.resolve() in seen:
            raise ConfigError(f"lmforge compare: the run {arg} is given twice")
        seen.add(p.resolve())
    records = [load_run(p) for p in paths]
    return write_compare(Path(cfg.compare.out) if cfg.compare.out else Path(cfg.runs_dir) / "compare", records)
