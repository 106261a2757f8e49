"""`lmforge compare`: two tiny runs that differ in learning rate side by side, and the bad-input cases.

Run: ``.venv/bin/pytest tests/report/test_compare_runs.py`` (about 30 s: two tiny runs).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.report.render import fmt
from tests.conftest import TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_corpus: Path) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    common = ["run", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]", "--train.threads=1"]
    before = torch.get_num_threads()
    cli_main([*common, "--name=lr-fast"])  # tiny's own 3e-3
    cli_main([*common, "--name=lr-slow", "--train.lr=1e-3"])
    torch.set_num_threads(before)
    return runs


def _compare(*args: str) -> int:
    try:
        cli_main(["compare", *args])
    except SystemExit as e:
        return int(e.code)
    return 0


def _rows(md: str, header_start: str) -> dict[str, list[str]]:
    """First column -> the other cells, for the Markdown table whose header starts with ``header_start``."""
    rows = {}
    for line in md[md.index(header_start):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, *rest = [c.strip() for c in line.strip("|").split(" | ")]
        rows[first] = rest
    return rows


def test_lr_is_the_only_difference_and_the_numbers_are_the_runs(two_runs: Path, tmp_path: Path, capsys):
    fast, slow = (json.loads((two_runs / n / "summary.json").read_text()) for n in ("lr-fast", "lr-slow"))
    out = tmp_path / "cmp"
    # One run by path, one by name under runs_dir.
    assert _compare(str(two_runs / "lr-fast"), "lr-slow", f"--runs_dir={two_runs}", "--out", str(out)) == 0
    assert "| train.lr | 0.003 | 0.001 |" in capsys.readouterr().out

    result = json.loads((out / "compare.json").read_text())
    assert result["differences"] == ["train.lr"]
    assert [(r["label"], r["config"]) for r in result["runs"]] == [("lr-fast", {"train.lr": 0.003}),
                                                                   ("lr-slow", {"train.lr": 0.001})]
    for run, summary in zip(result["runs"], (fast, slow), strict=True):
        res = run["results"]
        assert run["final_evaluation"] is True
        for key in ("train_loss", "val_loss", "val_bpb", "val_acc", "params", "train_seconds", "tokens_per_s"):
            assert res[key] == summary[key], key
        assert (res["tokens_seen"], res["steps"], res["stopped_by"]) == (30 * 8 * 32, 30, "steps")
    best = "lr-fast" if fast["val_bpb"] < slow["val_bpb"] else "lr-slow"
    assert result["best"] == best

    md = (out / "compare.md").read_text()
    assert _rows(md, "| config key |") == {"train.lr": ["0.003", "0.001"]}
    table = _rows(md, "|  | lr-fast | lr-slow |")
    assert table["validation bits per byte"] == [fmt(fast["val_bpb"]), fmt(slow["val_bpb"])]
    assert table["final training loss (nats/token)"] == [fmt(fast["train_loss"]), fmt(slow["train_loss"])]
    assert table["final validation loss (nats/token)"] == [fmt(fast["val_loss"]), fmt(slow["val_loss"])]
    assert table["training tokens"] == ["7,680", "7,680"] and table["steps (stopped by)"] == ["30 (steps)"] * 2
    assert table["parameters"] == [fmt(fast["params"])] * 2
    gap = abs(fast["val_bpb"] - slow["val_bpb"])
    assert table["vs best (bits per byte)"][[best == "lr-fast", best == "lr-slow"].index(True)] == "best"
    assert f"+{gap:.4f}" in " ".join(table["vs best (bits per byte)"])
    assert "![training and validation curves of every run](compare.png)" in md

    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    html = (out / "compare.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert embedded and base64.b64decode(embedded.group(1)) == png  # self-contained
    assert "<td>train.lr</td><td>0.003</td><td>0.001</td>" in html


def test_default_out_and_a_run_not_evaluated_yet(two_runs: Path, tmp_path: Path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(two_runs / "lr-slow", partial, ignore=shutil.ignore_patterns("ckpt", "pack", "clean", "collect"))
    (partial / "summary.json").unlink()
    (partial / "eval" / "manifest.json").unlink()
    assert _compare(str(two_runs / "lr-fast"), str(partial), f"--runs_dir={tmp_path}") == 0
    result = json.loads((tmp_path / "compare" / "compare.json").read_text())
    res = result["runs"][1]["results"]
    rows = [json.loads(line) for line in (partial / "train" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in rows if r["kind"] == "val"][-1]
    assert result["runs"][1]["final_evaluation"] is False
    assert (res["val_loss"], res["val_bpb"]) == (last_val["loss"], last_val["bpb"])  # the last estimate
    assert "Not evaluated yet (no summary.json): partial" in (tmp_path / "compare" / "compare.md").read_text()


def test_bad_runs_are_named(two_runs: Path, tmp_path: Path, capsys):
    def fails(code: int, *args: str) -> str:
        assert _compare(*args, f"--runs_dir={tmp_path}") == code
        return capsys.readouterr().err

    assert "no run folder 'nowhere'" in fails(2, "nowhere")
    (tmp_path / "notes").mkdir()
    assert f"{tmp_path / 'notes'} is not an lmforge run: it has no config.yaml" in fails(2, str(tmp_path / "notes"))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(two_runs / "lr-fast" / "config.yaml", untrained)
    assert f"{untrained} has no training metrics" in fails(2, str(untrained))
    (untrained / "train").mkdir()
    (untrained / "train" / "metrics.jsonl").write_text("")
    assert "holds no loss measurement yet" in fails(2, str(untrained))
    (untrained / "train" / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 3.0}\nnot json\n{}\n')
    assert "metrics.jsonl:2: not a JSON line" in fails(1, str(untrained))
    assert "lr-fast is given twice" in fails(2, str(two_runs / "lr-fast"), str(two_runs / "lr-fast"))
    assert "needs one or more run folders" in fails(2)
    assert not (tmp_path / "compare").exists()  # nothing written for a failed comparison


def test_differences_ignore_names_and_count_a_missing_key_as_none():
    from lmforge.report.compare_runs import RunRecord, compare, differences

    def record(name: str, **config) -> RunRecord:
        return RunRecord(name, Path(name), {"name": name, "runs_dir": f"/r/{name}", **config}, [])

    a = record("a", **{"train.lr": 0.003, "eval.tasks": ["speaker"], "compare.out": None, "seed": 7})
    b = record("b", **{"train.lr": 0.003, "eval.tasks": ["speaker", "cloze"], "seed": 7})  # older: no compare.out
    c = record("c", **{"train.lr": 0.003, "eval.tasks": ["speaker"], "compare.out": None, "seed": 8})
    assert differences([a, b, c]) == ["eval.tasks", "seed"]
    assert differences([a, a]) == []
    same_name = [RunRecord("", Path(p), {"seed": i}, []) for i, p in enumerate(("x/run", "y/run", "/z/x/run"))]
    assert [r["label"] for r in compare(same_name)["runs"]] == ["x/run", "y/run", "/z/x/run"]
    assert [r["label"] for r in compare(same_name[:2])["runs"]] == ["x/run", "y/run"]
