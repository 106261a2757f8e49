"""Tests for lmforge.report.card: the run card files, their numbers, escaping and sparse inputs.

Run: ``.venv/bin/pytest tests/test_card.py``.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from lmforge.report.card import fmt, write_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(with_val: bool = True) -> list[dict]:
    rows = []
    for step in range(10, 210, 10):
        rows.append({"step": step, "kind": "train", "loss": 5.0 - step / 60 + (0.1 if step % 20 else -0.1),
                     "lr": 0.001, "tokens_per_s": 9000.0, "mfu": 0.4})
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
        eval_stats={"step": 200, "val": {"loss": 2.34567, "tokens": 50_000}, "gap": 0.24567,
                    "per_doc": [{"id": "hamlet", "loss": 2.3}, {"id": "sonnets", "loss": 2.5}]},
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
                 "| stage_seconds.eval | 3.2 s |", "| documents | 38 | 4 |", "| bytes | 5,123,456 (5.123M) | 412,345 |",
                 "Held-out document ids: hamlet, sonnets", "| vocabulary size | 2,048 |", "| bytes per token | 3.123 |",
                 "| n_layers | 4 |", "| val.tokens | 50,000 |", "| hamlet | 2.3 |", "![", "(loss.png)",
                 "| gap (validation - training) | 0.2457 |", "```yaml\n# run name\nname: demo\n"]:
        assert text in md, text
    assert "A small generalization gap" in md  # 2.34567 - 2.1 is between the two thresholds
    order = [md.index(h) for h in ["## Final metrics", "## Loss curves", "## Overfitting check", "## Data",
                                   "## Tokenizer", "## Model", "## Evaluation", "## Samples", "## Resolved config"]]
    assert order == sorted(order)


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
