"""``lmforge <verb> [PATH] [--config FILE] [--name NAME] [--section.key=value ...]``

One table maps each verb to the function that does it; every verb reads the
same config (class defaults < ``--config`` YAML < dotted overrides). Stage
verbs run the stages they depend on first, skipping those already done.

    lmforge run --config configs/demo.yaml            # the whole pipeline
    lmforge train --name exp1 --train.lr=1e-3         # up to and including training
    lmforge eval runs/demo --eval.text=notes.txt      # score any text
    lmforge generate runs/demo --prompt "ROMEO:"      # sample
    lmforge sweep --config configs/demo.yaml --space configs/sweep-space.yaml   # tune hyperparameters
    lmforge compare-archs --config configs/compare-archs.yaml --budget-seconds 300   # bake-off
    lmforge compare runs/a runs/b --out runs/compare-ab  # finished runs side by side
    lmforge plan --budget 5m                          # the best recipe for 5 minutes on this machine
    lmforge <verb> --help                             # every option of that verb
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, RunConfig, field_help, load_config, to_yaml

# Offline by design: never let a Hugging Face library reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stages(until: str) -> Callable[[RunConfig, list[str]], None]:
    def cmd(cfg: RunConfig, args: list[str]) -> None:
        from lmforge.pipeline import run

        outputs = run(cfg, until=until)
        if until == "report" and "_stopped" not in outputs and "report" in outputs:  # ranks > 0 only train
            s = outputs["report"]["summary"]
            print(f"\nval loss {s['val_loss']:.4f} | ppl {s['val_ppl']:.2f} | bits/byte {s['val_bpb']:.4f} | "
                  f"acc {s['val_acc']:.3f} | {s['tokens_seen']:,} tokens in {s['train_seconds']:.0f}s "
                  f"| total {s['total_seconds']:.0f}s")
            print(f"run card: {outputs['report']['files']['html']}\nsummary:  {cfg.run_dir / 'summary.json'}")
    return cmd


def _eval(cfg: RunConfig, args: list[str]) -> None:
    if not cfg.eval.text:
        from lmforge.pipeline import run

        print(json.dumps(run(cfg, until="eval")["eval"], indent=2))
        return
    from lmforge.eval.heldout import evaluate_files
    from lmforge.trained import load_model

    tm = load_model(args[0] if args else cfg.run_dir)  # also an export or a Hugging Face folder
    result = evaluate_files(tm, cfg.eval.text, cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "per_doc"}, indent=2))


def _generate(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.serve.sample import generate_cli

    generate_cli(args[0] if args else str(cfg.run_dir), cfg)


def _compare_archs(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.tune.bakeoff import main as compare

    result = compare(cfg)
    print("\n" + Path(result["files"]["md"]).read_text(encoding="utf-8"))
    print(f"table: {result['files']['md']} (and .json)\nplot:  {result['files']['png']}")


def _compare(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.report.compare_runs import main as compare_runs

    result = compare_runs(cfg, args)
    print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
    print(f"table:  {result['files']['md']} (and .json)\npage:   {result['files']['html']}\n"
          f"curves: {result['files']['png']}")


def _sweep(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.tune.sweep import main as sweep

    sweep(cfg, args)


def _harness(cfg: RunConfig, args: list[str]) -> None:
    try:
        from lmforge.eval.harness import main as harness
    except ImportError:
        raise ConfigError("lmforge harness needs lm-evaluation-harness: pip install 'lmforge[eval]'") from None
    print(json.dumps(harness(cfg, args), indent=2))


def _serve(cfg: RunConfig, args: list[str]) -> None:
    try:
        from lmforge.serve.api import main as serve
    except ImportError as e:
        raise ConfigError(f"lmforge serve needs the serve extra: pip install 'lmforge[serve]' ({e})") from None
    serve(cfg, args)


def _export(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.export import main as export

    try:
        export(cfg, args)
    except ImportError as e:
        raise ConfigError(f"lmforge export needs the export extra: pip install 'lmforge[export]' ({e})") from None


def _finetune(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.finetune.run import main as finetune
    from lmforge.report.card_finetune import summary_lines

    print("\n".join(summary_lines(finetune(cfg, cfg.run_dir), cfg.run_dir / "finetune")))


def _chat(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.serve.repl import main as chat

    chat(cfg, args[0] if args else str(cfg.run_dir))


def _plan(cfg: RunConfig, args: list[str]) -> None:
    from lmforge.tune.plan import main as plan

    result = plan(cfg)
    c, files = result["chosen"], result["files"]
    print(f"\nplan for {result['budget']['text']} ({result['target']}): width {c['d_model']}, {c['n_layers']} layers, "
          f"{c['params']:,} parameters, predicted {c['predicted_bpb']:.3f} bits per byte")
    for r in result["confirmed"]:  # the shapes trained for a share of the budget, between which it chose
        how = (f"its own curve through its {r['shape_curve']['points']} runs" if r["shape_curve"] else
               f"the fit corrected by its miss of {r['confirmation_miss']:+.3f} at the confirmation")
        print(f"confirmed {r['d_model']}x{r['n_layers']}: predicted {r['predicted_bpb']:.3f} ({how}; the shared fit "
              f"with that correction: {r['fit_bpb']:.3f})")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"recipe: {files['config']}\ntrain:  lmforge run --config {files['config']}\n"
          f"plan:   {files['json']}\nplot:   {files['png']}")


def _config(cfg: RunConfig, args: list[str]) -> None:
    print(to_yaml(cfg))


# verb -> (function, one-line help, config sections its --help lists, takes a PATH)
VERBS: dict[str, tuple[Callable, str, tuple[str, ...], bool]] = {
    "run": (_stages("report"), "the whole pipeline: collect, clean, docs, tokenizer, pack, train, eval, finetune, sample, "
            "report", (), False),
    "collect": (_stages("collect"), "read files, datasets, databases and web pages into document shards "
                "(runs/NAME/collect)", ("data", "collect"), False),
    "clean": (_stages("clean"), "repair, filter, scrub, deduplicate and decontaminate the collected documents; "
              "writes data_card.json (after collect)", ("data", "collect", "clean"), False),
    "prepare": (_stages("docs"), "read the training text and hold out validation documents", ("data",), False),
    "tokenize": (_stages("tokenizer"), "train the tokenizer (after prepare)", ("data", "tokenizer"), False),
    "pack": (_stages("pack"), "encode the text into token shards (after tokenize)", ("data", "tokenizer"), False),
    "train": (_stages("train"), "pre-train a model (after pack); resumes from the newest checkpoint",
              ("data", "tokenizer", "model", "train"), False),
    "eval": (_eval, "score the run's validation text, or any text with --eval.text=FILE (PATH = run, checkpoint, export or HF folder)",
             ("eval",), True),
    "generate": (_generate, "continue prompts with a trained model (PATH = run, checkpoint, export or HF folder)", ("sample",), True),
    "compare": (_compare, "finished runs side by side: config differences, results, overlaid curves "
                "(PATH = run folders or names; --out DIR)", ("compare",), True),
    "compare-archs": (_compare_archs, "train each architecture for the same time on the same data; table and plot",
                      ("compare", "model", "train"), False),
    "sweep": (_sweep, "hyperparameter search with Optuna over a --space FILE; resumes; writes best.yaml",
              ("sweep", "model", "train"), False),
    "harness": (_harness, "score eval.tasks with lm-evaluation-harness (PATH = run, checkpoint, export or HF folder)", ("eval",), True),
    "serve": (_serve, "OpenAI-compatible API, chat page at /, /health, /metrics (PATH = run, checkpoint, export or HF folder); a "
              "fine-tuned model is served as NAME-finetune", ("serve",), True),
    "export": (_export, "write the model as --format hf|gguf|lmforge to --out PATH (PATH = run, checkpoint, export or HF folder)",
               ("export",), True),
    "finetune": (_finetune, "fine-tune a pretrained model (--init PATH) on chat or text, fully or with LoRA; "
                 "resumes", ("finetune", "train"), False),
    "chat": (_chat, "chat with a model in the terminal; /reset, /exit (PATH = run, checkpoint, export or HF folder)", ("sample",), True),
    "plan": (_plan, "the best recipe for a time budget (--budget 5m; --gpu h100): short cached probes here, a fit of "
             "loss against size and tokens; writes plan.yaml (for lmforge run --config), plan.json, plan.png",
             ("plan", "data"), False),
    "config": (_config, "print the resolved config as YAML", (), False),
}
# Verbs whose PATH is a model, opened by lmforge.trained.load_model under one rule (lmforge.trained.PATH_RULE).
MODEL_VERBS = ("eval", "harness", "generate", "serve", "export", "chat")


def usage() -> str:
    lines = [__doc__.strip(), "", "verbs:"]
    lines += [f"  {v:<10} {h}" for v, (_, h, _, _) in VERBS.items()]
    return "\n".join(lines)


def verb_help(verb: str) -> str:
    _, text, sections, takes_path = VERBS[verb]
    path = " [PATH]" if takes_path else ""
    lines = [f"usage: lmforge {verb}{path} [--config FILE] [--name NAME] [--section.key=value ...]", "", text, ""]
    if verb in MODEL_VERBS:
        from lmforge.trained import PATH_RULE

        lines += [f"PATH (default: the run of --name): {PATH_RULE}", ""]
    lines += ["  --config FILE        YAML recipe (e.g. configs/demo.yaml); overrides come after it",
              "  --name NAME          run name: outputs go to runs/NAME (same as --name=NAME)"]
    if verb == "compare":
        lines[0] = "usage: lmforge compare RUN [RUN ...] [--out DIR] [--runs_dir DIR]"
        lines.append("  --out DIR            where the report goes (same as --compare.out=DIR; default runs_dir/compare)")
    if verb == "compare-archs":
        lines.append("  --budget-seconds S   training seconds per architecture (same as --compare.budget_seconds=S)")
    if verb == "export":
        lines.append("  --format FORMAT      hf, gguf or lmforge (same as --export.format=FORMAT)")
        lines.append("  --out PATH           output folder or .gguf file (same as --export.out=PATH)")
    if verb == "generate":
        lines.append("  --prompt TEXT        a prompt to continue (repeatable; replaces sample.prompts)")
    if verb in ("collect", "clean", "prepare", "run"):
        lines.append("  --strict             stop at the first bad input (same as --collect.strict=true)")
    if verb == "finetune":
        from lmforge.trained import PATH_RULE

        lines.append("  --init PATH          model to start from: run, checkpoint, export or Hugging Face folder "
                     f"(same as --finetune.init=PATH); {PATH_RULE}")
    if verb == "sweep":
        lines.append("  --space FILE         search space YAML (same as --sweep.space=FILE); see docs/tuning.md")
    if verb == "plan":
        lines.append("  --budget TIME        training time with its unit: 90s, 5m, 2h (same as --plan.budget=TIME)")
        lines.append("  --gpu NAME           plan for a GPU (h100, a100, ...) from its datasheet FLOP/s x --plan.mfu "
                     "(same as --plan.gpu=NAME)")
    lines += ["", "config keys (--key=value; values are YAML: 3e-4, true, [a, b], null):"]
    for key, default, desc in field_help():
        if not sections or key.split(".")[0] in sections or "." not in key:
            lines.append(f"  --{key}={default}\n      {desc}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[str, RunConfig, list[str]]:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise ConfigError(f"unknown verb '{verb}'; choose one of: {', '.join(VERBS)}")
    if any(a in ("-h", "--help") for a in rest):
        print(verb_help(verb))
        raise SystemExit(0)
    config_file, overrides, positional, prompts = None, [], [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if key == "strict" and not eq:  # a bare flag: `lmforge collect --strict`
            overrides.append("collect.strict=true")
            i += 1
            continue
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"option --{key} needs a value")
            value, i = rest[i + 1], i + 1
        i += 1
        if key == "config":
            config_file = value
        elif key == "budget-seconds":
            overrides.append(f"compare.budget_seconds={value}")
        elif key == "out" and verb == "compare":  # `lmforge compare RUN RUN --out DIR`
            overrides.append(f"compare.out={value}")
        elif key in ("format", "out"):  # `lmforge export RUN --format hf --out DIR`
            overrides.append(f"export.{key}={value}")
        elif key == "prompt":
            prompts.append(value)
        elif key == "init":  # `lmforge finetune --init runs/demo`
            overrides.append(f"finetune.init={value}")
        elif key == "space":
            overrides.append(f"sweep.space={value}")
        elif key in ("budget", "gpu") and verb == "plan":  # `lmforge plan --budget 5m --gpu h100`
            overrides.append(f"plan.{key}={json.dumps(value)}")  # a string as given: 5m, not YAML's reading
        else:
            overrides.append(f"{key}={value}")
    if positional and not VERBS[verb][3]:
        raise ConfigError(f"'lmforge {verb}' takes no positional argument (got '{positional[0]}')")
    if prompts:
        overrides.append(f"sample.prompts={json.dumps(prompts)}")
    return verb, load_config(config_file, overrides), positional


def main(argv: list[str] | None = None) -> None:
    from lmforge.data.sources import DataError
    from lmforge.train.checkpoint import CheckpointError

    warnings.simplefilter("default")
    try:
        verb, cfg, args = parse(sys.argv[1:] if argv is None else argv)
        VERBS[verb][0](cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, CheckpointError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
