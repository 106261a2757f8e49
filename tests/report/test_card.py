"""Tests for lmforge.report.card: the run card files, their numbers, escaping and sparse inputs.

Run: ``.venv/bin/pytest tests/report/test_card.py``.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from lmforge.report.card import SECTIONS, CardInputs, fmt, write_card
from lmforge.report.plots import gap_points
from lmforge.report.render import Heading, Table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(with_val: bool = True) -> list[dict]:
    rows = []
    for step in range(10, 210, 10):
        rows.append({"step": step, "kind": "train", "loss": 5.0 - step / 60 + (0.1 if step % 20 else -0.1),
                     "lr": 0.001, "grad_norm": 1.0 - step / 400, "tokens_per_s": 9000.0, "mfu": 0.4})
        if with_val and step % 50 == 0:
            rows.append({"step": step, "kind": "val", "loss": 5.1 - step / 70, "bpb": 2.4 - step / 500,
                         "ppl": 18.0, "acc": 0.4})
    return rows


def _card(tmp_path: Path, **changes) -> dict[str, Path]:
    args = dict(
        config_yaml="# run name\nname: demo\nmodel:\n  arch: transformer\n",
        summary={"name": "demo", "val_loss": 2.34567, "val_ppl": 10.4432, "val_bpb": 1.8765, "val_acc": 0.41234,
                 "train_loss": 2.1, "tokens_seen": 1234567, "params": 812345, "train_seconds": 93.42,
                 "total_seconds": 4000.0, "tokens_per_s": 13245.7, "mfu": 0.0123, "device": "cpu",
                 "stage_seconds": {"train": 93.4, "eval": 3.2},
                 "model": {"arch": "transformer", "params": 812345, "n_layers": 4, "d_model": 192}},
        metrics=_metrics(),
        data_stats={"train_docs": 38, "val_docs": 4, "train_bytes": 5_123_456, "val_bytes": 412_345,
                    "val_ids": ["hamlet", "sonnets"], "split": "docs"},
        tokenizer_stats={"kind": "bpe", "vocab_size": 2048, "bytes_per_token": 3.123},
        eval_stats={"step": 200, "val": {"loss": 2.34567, "tokens": 50_000, "bpb": 1.8765, "acc": 0.41234},
                    "train": {"loss": 2.1, "tokens": 50_000, "bpb": 1.7, "acc": 0.45}, "gap": 0.24567,
                    "per_doc": [{"id": "hamlet", "loss": 2.3}, {"id": "sonnets", "loss": 2.5}],
                    "tasks": [{"task": "speaker", "kind": "multiple_choice", "items": 100, "acc": 0.34,
                               "acc_norm": 0.36, "acc_bytes": 0.35, "chance": 0.25},
                              {"task": "cloze", "kind": "generate", "items": 60, "exact_match": 0.05, "f1": 0.125}]},
        training={"steps": 200, "stopped_by": "early_stop", "planned_steps": 500, "best_val_loss": 2.2429,
                  "best_step": 150, "early_stop_patience": 2, "early_stop_min_delta": 0.01},
        samples=[{"prompt": "ROMEO:", "completion": " O <script>alert('x')</script> & more", "tokens": 12}],
    )
    args.update(changes)
    return write_card(tmp_path / "run", **args)


def test_files_exist_and_png_is_valid(tmp_path):
    paths = _card(tmp_path)
    assert set(paths) == {"md", "html", "png"}
    assert paths["md"] == tmp_path / "run" / "report" / "card.md"
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    html = paths["html"].read_text(encoding="utf-8")
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert embedded and base64.b64decode(embedded.group(1)) == png  # self-contained: the plot is inside
    assert "<style>" in html and "<link" not in html


def test_markdown_holds_the_formatted_metrics(tmp_path):
    md = _card(tmp_path)["md"].read_text(encoding="utf-8")
    for text in ["| validation loss (nats/token) | 2.346 |", "| validation perplexity | 10.44 |",
                 "| validation bits per byte | 1.877 |", "| validation next-token accuracy | 41.23% |",
                 "| final training loss | 2.1 |", "| training tokens seen | 1,234,567 (1.235M) |",
                 "| parameters | 812,345 |", "| training time | 93.42 s (1m 33s) |", "| total time | 4,000 s (1h 06m 40s) |",
                 "| training throughput (tokens/s) | 13,246 |", "| model flops utilization (MFU) | 1.23% |",
                 "| time in the eval stage | 3.2 s |", "| documents | 38 | 4 |", "| bytes | 5,123,456 (5.123M) | 412,345 |",
                 "Held-out document ids: hamlet, sonnets", "| vocabulary size | 2,048 |", "| bytes per token | 3.123 |",
                 "| n_layers | 4 |", "| tokens scored | 50,000 | 50,000 | - |", "| hamlet | 2.3 |", "![", "(loss.png)",
                 "| gap (validation - training) | 0.2457 |", "```yaml\n# run name\nname: demo\n"]:
        assert text in md, text
    assert "A small generalization gap" in md  # 2.34567 - 2.1 is between the two thresholds
    order = [md.index(h) for h in ["## Final metrics", "## Training curves", "## Overfitting check", "## Data",
                                   "## Tokenizer", "## Model", "## Evaluation", "## Samples", "## Resolved config"]]
    assert order == sorted(order)


def test_every_final_metric_row_is_labelled_and_formatted(tmp_path):
    summary = {"val_loss": 2.3, "steps": 300, "stopped_by": "steps", "generalization_gap": 0.41,
               "stage_seconds": {"collect": 1.5}, "finetune": {"task_acc_base": 0.225, "task_acc": 0.325,
                                                                "val_bpb_base": 2.1, "val_bpb": 2.2}}
    md = _card(tmp_path, summary=summary)["md"].read_text(encoding="utf-8")
    rows = dict(_rows(_section(md, "## Final metrics"), "| metric |"))
    assert rows == {"validation loss (nats/token)": "2.3", "optimizer steps": "300", "training stopped by": "steps",
                    "generalization gap (validation - training loss)": "0.41",
                    "time in the collect stage": "1.5 s",
                    "fine-tuning task accuracy: base model": "22.5%",
                    "fine-tuning task accuracy: fine-tuned model": "32.5%",
                    "pre-training validation bits per byte: base model": "2.1",
                    "pre-training validation bits per byte: fine-tuned model": "2.2"}


def test_samples_are_escaped(tmp_path):
    paths = _card(tmp_path)
    html = paths["html"].read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "<strong>ROMEO:</strong> O &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more</pre>" in html
    md = paths["md"].read_text(encoding="utf-8")
    assert "<script>" not in md and "**Sample 1 (tokens: 12)**" in md


def test_no_val_points_and_no_samples(tmp_path):
    paths = _card(tmp_path, metrics=_metrics(with_val=False), samples=[],
                  summary={"train_loss": 3.0, "tokens_seen": 1000}, eval_stats={}, data_stats={},
                  tokenizer_stats={}, title="Bare <run>")
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    md = paths["md"].read_text(encoding="utf-8")
    assert md.startswith("# Bare <run>\n")
    assert "No samples were generated." in md and "Not enough measurements" in md
    assert "| final training loss | 3 |" in md and "| training tokens seen | 1,000 |" in md
    html = paths["html"].read_text(encoding="utf-8")
    assert "<title>Bare &lt;run&gt;</title>" in html


def test_overfitting_from_metrics_when_summary_lacks_losses(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 3.0 - s / 100} for s in range(10, 110, 10)]
    rows += [{"step": s, "kind": "val", "loss": v} for s, v in [(25, 3.0), (50, 2.8), (75, 2.9), (100, 3.1)]]
    md = _card(tmp_path, summary={}, metrics=rows)["md"].read_text(encoding="utf-8")
    assert "| final training loss | 2 |" in md and "| final validation loss | 3.1 |" in md
    assert "| gap (validation - training) | 1.1 |" in md and "overfitting (memorizing" in md
    assert "rose from its best 2.8 at step 50 to 3.1 at step 100" in md


def test_a_large_gap_while_validation_still_falls_is_not_called_overfitting(tmp_path):
    # The demo's shape: training loss falls faster than validation loss, which falls at every estimate.
    rows = [{"step": s, "kind": "train", "loss": 4.0 - s / 40} for s in range(10, 110, 10)]
    rows += [{"step": s, "kind": "val", "loss": v} for s, v in [(25, 3.9), (50, 3.7), (75, 3.6), (100, 3.55)]]
    md = _card(tmp_path, summary={}, metrics=rows)["md"].read_text(encoding="utf-8")
    assert "| gap (validation - training) | 2.05 |" in md
    assert "overfitting (memorizing" not in md and "still falling at the last estimates: not overfitting" in md


def test_validation_that_stalls_while_training_falls_is_overfitting(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 4.0 - s / 40} for s in range(10, 110, 10)]
    rows += [{"step": s, "kind": "val", "loss": v} for s, v in [(25, 3.9), (50, 3.7), (75, 3.69), (100, 3.689)]]
    md = _card(tmp_path, summary={}, metrics=rows)["md"].read_text(encoding="utf-8")
    assert "stopped improving while training loss fell: the model is overfitting" in md


def _section(md: str, heading: str) -> str:
    """The Markdown under ``heading`` up to the next heading of the same or a higher level."""
    rest = md[md.index(heading + "\n") + len(heading):]
    end = re.search(r"\n#{1,%d} " % heading.index(" "), rest)  # noqa: UP031 (a regex quantifier)
    return rest[: end.start()] if end else rest


def _rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first Markdown table whose header starts with ``header_start``."""
    body = []
    for line in text[text.index(header_start):].splitlines()[2:]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return body


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR width, height


def test_gap_over_time_is_tabled_with_its_trend(tmp_path):
    md = _card(tmp_path)["md"].read_text(encoding="utf-8")
    section = _section(md, "## Overfitting check: training vs validation")
    # Train loss at step s: 5 - s/60 +- 0.1; validation: 5.1 - s/70, bits per byte 2.4 - s/500.
    assert _rows(section, "| step | training loss |") == [
        ["50", "4.267", "4.386", "0.119", "2.3"], ["100", "3.233", "3.671", "0.4381", "2.2"],
        ["150", "2.6", "2.957", "0.3571", "2.1"], ["200", "1.567", "2.243", "0.6762", "2"]]
    assert "The gap (validation - training) grew: 0.119 at step 50, 0.6762 at step 200." in section
    # A long run: at most 12 evenly spaced estimates, the first and the last among them.
    rows = [{"step": s, "kind": k, "loss": 3.0} for s in range(1, 31) for k in ("train", "val")]
    long = _card(tmp_path / "long", metrics=rows, summary={})["md"].read_text(encoding="utf-8")
    steps = [r[0] for r in _rows(long, "| step | training loss |")]
    assert len(steps) == 12 and steps[0] == "1" and steps[-1] == "30" and steps == sorted(steps, key=int)


def test_gap_points_pair_each_estimate_with_the_last_training_loss():
    rows = [{"step": 5, "kind": "train", "loss": 4.0}, {"step": 10, "kind": "train", "loss": 3.0},
            {"step": 3, "kind": "val", "loss": 9.0},  # before any training loss: no pair
            {"step": 10, "kind": "val", "loss": 3.5}, {"step": 12, "kind": "val", "loss": 3.2}]
    assert gap_points(rows) == [(10.0, 3.0, 3.5), (12.0, 3.0, 3.2)]


def test_evaluation_tables_hold_counts_and_the_early_stop(tmp_path):
    md = _card(tmp_path)["md"].read_text(encoding="utf-8")
    section = _section(md, "## Evaluation")
    assert _rows(section, "| measure | validation | training slice |") == [
        ["tokens scored", "50,000", "50,000", "-"], ["loss (nats/token)", "2.346", "2.1", "0.2457"],
        ["bits per byte", "1.877", "1.7", "0.1765"], ["next-token accuracy", "41.23%", "45%", "-3.766%"]]
    assert _rows(section, "| task | kind | items |") == [
        ["speaker", "multiple_choice", "100", "34% (34/100)", "36% (36/100)", "35% (35/100)", "25%", "-", "-"],
        ["cloze", "generate", "60", "-", "-", "-", "-", "5% (3/60)", "12.5%"]]
    assert ("Early stopping ended training at step 200 of 500: the validation estimate did not improve on its "
            "best by more than 0.01 for 2 estimate(s) in a row; the best validation estimate was 2.243 at step "
            "150.") in section
    assert ["steps trained", "200 of 500"] in _rows(section, "|  | value |")
    assert "| hamlet | 2.3 |" in section and "| step | 200 |" not in section  # shown once, in the prose
    off = _card(tmp_path / "off", training={"steps": 30, "stopped_by": "steps", "early_stop_patience": 0})
    assert ("Early stopping was off (train.early_stop_patience = 0): training ran all 30 steps."
            in off["md"].read_text(encoding="utf-8"))


def test_figure_has_one_panel_per_measured_series(tmp_path):
    # loss, bits per byte, gap, learning rate, gradient norm, tokens/s: 3 x 2 panels of 420 x 330 pixels.
    assert _png_size(_card(tmp_path / "a")["png"].read_bytes()) == (1260, 660)
    tasks = [*_metrics(), {"step": 100, "kind": "tasks", "speaker.acc": 0.3}, {"step": 200, "kind": "tasks",
                                                                               "speaker.acc": 0.4}]
    assert _png_size(_card(tmp_path / "b", metrics=tasks)["png"].read_bytes()) == (1680, 660)  # 7 panels: 4 x 2
    train_only = [{"step": s, "kind": "train", "loss": 3.0, "lr": 0.1} for s in (1, 2)]
    assert _png_size(_card(tmp_path / "c", metrics=train_only)["png"].read_bytes()) == (840, 330)


def test_a_section_can_be_added(tmp_path):
    def finetune(c: CardInputs) -> list:
        return [Heading(2, "Fine-tuning"), Table(["", "base", "fine-tuned"],
                                                 [["loss", fmt(c.extra["base"]), fmt(c.extra["tuned"])]])]

    before = list(SECTIONS)
    sections = [*SECTIONS[:-1], finetune, SECTIONS[-1]]
    md = _card(tmp_path, sections=sections, extra={"base": 2.5, "tuned": 2.1})["md"].read_text(encoding="utf-8")
    assert "## Fine-tuning\n\n|  | base | fine-tuned |\n|---|---|---|\n| loss | 2.5 | 2.1 |" in md
    assert md.index("## Samples") < md.index("## Fine-tuning") < md.index("## Resolved config")
    assert before == SECTIONS


def test_no_metrics_at_all_still_draws(tmp_path):
    paths = _card(tmp_path, metrics=[], summary={})
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert "No final metrics were recorded." in paths["md"].read_text(encoding="utf-8")


def test_bad_metrics_rows_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\[1\]"):
        _card(tmp_path, metrics=[{"step": 1, "kind": "train", "loss": 2.0}, {"kind": "val"}])
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        _card(tmp_path, samples=[{"prompt": "x"}])


def test_code_fence_outgrows_backticks(tmp_path):
    md = _card(tmp_path, config_yaml="note: '```'\n")["md"].read_text(encoding="utf-8")
    assert "````yaml\nnote: '```'\n````" in md


@pytest.mark.parametrize("value,key,text", [
    (0.123456, "", "0.1235"), (12345.6, "", "12,346"), (3, "", "3"), (2_500_000, "params", "2,500,000 (2.5M)"),
    (-3_000_000_000, "", "-3,000,000,000 (-3B)"), (0, "", "0"),
    (0.4, "mfu", "40%"), (59.5, "train_seconds", "59.5 s"), (125.0, "x_seconds", "125 s (2m 05s)"), (36000.0, "seconds", "36,000 s (10h 00m 00s)"),
    (None, "", "-"), (True, "", "yes"), (float("nan"), "", "nan"), ([1, 2], "", "1, 2"), (1e-5, "", "1e-05"),
])
def test_fmt(value, key, text):
    assert fmt(value, key) == text


def test_the_data_cards_drop_table_and_chart(tmp_path):
    drops = [{"stage": "collect", "step": "read", "reason": "binary", "documents": 2, "bytes": None},
             {"stage": "clean", "step": "language", "reason": "wrong_language", "documents": 7, "bytes": 1_234_567},
             {"stage": "clean", "step": "dedup", "reason": "exact_duplicate", "documents": 3, "bytes": 45_000}]
    paths = _card(tmp_path, data_stats={"train_docs": 38, "val_docs": 4, "drops": drops})
    md = paths["md"].read_text(encoding="utf-8")
    assert "| stage | step | reason | documents | MB |" in md
    assert "| collect | read | binary | 2 | - |" in md
    assert "| clean | language | wrong_language | 7 | 1.235 |" in md
    assert "| clean | dedup | exact_duplicate | 3 | 0.045 |" in md
    assert "Documents left out: 12" in md and "![documents and MB dropped per reason](drops.png)" in md
    png = paths["drops.png"].read_bytes()
    assert paths["drops.png"] == tmp_path / "run" / "report" / "drops.png" and png.startswith(PNG_MAGIC)


def test_no_drops_no_chart(tmp_path):
    paths = _card(tmp_path, data_stats={"train_docs": 38, "drops": []})
    assert "drops.png" not in paths and "Documents left out" not in paths["md"].read_text(encoding="utf-8")


def test_the_run_card_takes_the_drop_table_from_the_data_card(tmp_path):
    from lmforge.data.data_card import drop_table
    from lmforge.report.run_card import _data_stats

    ledger = {"documents": {"in": 10, "kept": 6, "dropped": 4}, "bytes": {"in": 900, "kept": 500},
              "dropped": {"wrong_language": 3, "exact_duplicate": 1}, "languages": {},
              "drops": [{"step": "language", "reason": "wrong_language", "documents": 3, "bytes": 300},
                        {"step": "dedup", "reason": "exact_duplicate", "documents": 1, "bytes": 100}]}
    card = {"collect": {"documents": 10, "skipped": {"binary": 2}}, "clean": ledger,
            "drops": drop_table({"skipped": {"binary": 2}}, ledger)}
    (tmp_path / "data_card.json").write_text(json.dumps(card))
    stats = _data_stats({"docs": {"train_docs": 5}, "clean": {"data_card": str(tmp_path / "data_card.json")}})
    assert stats["drops"] == [
        {"stage": "collect", "step": "read", "reason": "binary", "documents": 2, "bytes": None},
        {"stage": "clean", "step": "language", "reason": "wrong_language", "documents": 3, "bytes": 300},
        {"stage": "clean", "step": "dedup", "reason": "exact_duplicate", "documents": 1, "bytes": 100}]
    md = _card(tmp_path, data_stats=stats)["md"].read_text(encoding="utf-8")
    assert "| clean | language | wrong_language | 3 | 0.000 |" in md and "Documents left out: 6" in md
