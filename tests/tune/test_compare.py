"""`lmforge compare-archs` end to end on the tiny preset with a one-second budget, and its recipe checks.

Run: ``pytest tests/tune/test_compare.py`` (about 15 s: two families, each a full tiny run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.cli import parse
from lmforge.config import ConfigError, load_config
from lmforge.report.bakeoff import rank, verdict
from lmforge.tune.bakeoff import arch_config
from tests.conftest import ROOT, TINY, run_cli

RECIPES = json.dumps({"lstm": {"model": {"rnn": {"bptt": 16}}, "train": {"lr": 0.01}}})


@pytest.fixture(scope="module")
def bakeoff(tmp_path_factory, small_corpus: Path) -> tuple[Path, list[str]]:
    runs = tmp_path_factory.mktemp("bakeoff")
    argv = ["compare-archs", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]",
            "--budget-seconds", "1", "--compare.archs=[transformer,lstm]", "--compare.decode_tokens=16",
            f"--compare.recipes={RECIPES}", "--train.threads=1", "--compare.val_points=4"]
    before = torch.get_num_threads()
    cli_main(argv)
    torch.set_num_threads(before)
    return runs, argv


def test_table_json_and_plot(bakeoff):
    runs, _ = bakeoff
    out = runs / "tiny"
    result = json.loads((out / "compare.json").read_text())
    assert [r["arch"] for r in result["archs"]] == ["transformer", "lstm"]
    assert result["same_tokenizer"] and result["budget_seconds"] == 1.0
    assert sorted(result["ranked"]) == ["lstm", "transformer"]
    plan = json.loads((out / "plan.json").read_text())
    for row in result["archs"]:
        run = Path(row["run"])
        assert run == runs / f"tiny-{row['arch']}"
        summary = json.loads((run / "summary.json").read_text())
        # The table's figures are the run's own: final bits per byte from the eval stage, sizes from training.
        assert row["val_bpb"] == summary["val_bpb"] and row["params"] == summary["params"]
        assert row["steps"] <= plan[row["arch"]]["steps"] == row["planned_steps"]
        # The budget holds: a run stops at the first step that reaches it (a tiny step is milliseconds).
        assert row["train_seconds"] < 1.0 + 2.0
        assert row["decode_tokens_per_s"] > 0 and row["train_tokens_per_s"] > 0
        seconds = [s for s, _ in row["curve"]]
        assert len(seconds) >= 2 and seconds == sorted(seconds)
    lstm = result["archs"][1]
    assert lstm["lr"] == 0.01  # the recipe was applied to its family only
    assert result["archs"][0]["lr"] == load_config(TINY).train.lr
    assert load_config(runs / "tiny-lstm" / "config.yaml").model.rnn.bptt == 16
    md = (out / "compare.md").read_text()
    assert md.count("\n| transformer |") == 1 and md.count("\n| lstm |") == 1
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()


def test_rerun_reuses_the_plan_and_the_runs(bakeoff):
    runs, argv = bakeoff
    manifests = {a: runs / f"tiny-{a}" / "train" / "manifest.json" for a in ("transformer", "lstm")}
    before = {a: json.loads(p.read_text())["finished_at"] for a, p in manifests.items()}
    plan = (runs / "tiny" / "plan.json").read_text()
    threads = torch.get_num_threads()
    cli_main(argv)
    torch.set_num_threads(threads)
    assert {a: json.loads(p.read_text())["finished_at"] for a, p in manifests.items()} == before
    assert (runs / "tiny" / "plan.json").read_text() == plan


def test_recipes_are_checked_before_training():
    cfg = load_config(TINY, ["compare.recipes={cnn: {model: {cnn: {kernel_size: 99}}}}"])
    with pytest.raises(ConfigError, match=r"compare\.recipes\.cnn .*model\.cnn\.kernel_size \(99\)"):
        arch_config(cfg, "cnn")
    assert arch_config(cfg, "lstm").model.arch == "lstm"  # another family's recipe does not apply
    with pytest.raises(ConfigError, match=r"compare\.recipes\.lstm\.model\.arch: set by compare-archs"):
        load_config(TINY, ["compare.recipes={lstm: {model: {arch: gru}}}"])
    assert parse(["compare-archs", "--budget-seconds", "42"])[1].compare.budget_seconds == 42


def test_bad_recipe_exits_2_before_any_training(tmp_path: Path):
    result = run_cli("compare-archs", "--config", str(TINY), f"--runs_dir={tmp_path}",
                     "--compare.recipes={lstm: {model: {rnn: {bptt: 999}}}}", cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: compare.recipes.lstm") and "model.rnn.bptt (999)" in last
    assert not (tmp_path / "tiny-transformer").exists()  # the transformer, listed first, never started


def test_unknown_bakeoff_arch_names_the_field():
    with pytest.raises(ConfigError, match=r"compare\.archs: unknown architecture 'rwkv'"):
        parse(["compare-archs", "--compare.archs=[lstm, rwkv]"])


def test_verdict_says_who_leads_and_by_how_much():
    rows = [{"arch": "lstm", "val_bpb": 2.2}, {"arch": "transformer", "val_bpb": 2.0}, {"arch": "cnn", "val_bpb": 2.5}]
    assert [r["arch"] for r in rank([dict(r) for r in rows])] == ["transformer", "lstm", "cnn"]
    assert rank([dict(r) for r in rows])[1]["vs_best"] == "+0.2000 (+10.0%)"
    assert verdict(rows).startswith("At equal training time, transformer leads with 2.0000 bits per byte, 0.2000")
    rows[0]["val_bpb"], rows[2]["val_bpb"] = 1.0, 1.5  # lstm, cnn, then the transformer
    assert "The transformer trails it by 1.0000 bits per byte (100.0%)" in verdict(rows)
