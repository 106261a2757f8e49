"""Preference tuning through the CLI: DPO and SimPO runs, exact resume, the before/after figures, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.finetune.build_set import KINDS, MANIFEST
from lmforge.finetune.build_set import main as build_set
from lmforge.finetune.evaluate import preference_report
from lmforge.finetune.setup import EMBEDDED_DIR, EMBEDDED_TRAIN, EMBEDDED_VAL, PAIRS_HELDOUT, PAIRS_TRAIN, PAIRS_VAL
from lmforge.report.card_finetune import comparison_rows, summary_keys
from tests.finetune.test_finetune_run import QUIET
from tests.in_process import call_cli
from tests.serving import make_run


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("base"), context=96)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """40 pairs of the embedded set (their prompts fit the tiny model's context of 96 tokens)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = (EMBEDDED_DIR / PAIRS_TRAIN).read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([ln for ln in lines if len(ln) < 260][:40]) + "\n", encoding="utf-8")
    return path


def _run(base: Path, runs: Path, name: str, *extra: str) -> int:
    return call_cli("finetune", "--init", str(base), f"--runs_dir={runs}", f"--name={name}", "--finetune.batch_size=4",
                    "--finetune.eval_batches=2", "--finetune.steps=4", "--finetune.lr=3e-3", "--finetune.ckpt_every=0",
                    "--finetune.max_length=96", *QUIET, *extra)


def test_dpo_run_reports_preferences_and_resumes_exactly(base, pairs, tmp_path):
    assert _run(base, tmp_path, "whole", "--finetune.mode=dpo", f"--finetune.data={pairs}") == 0
    result = json.loads((tmp_path / "whole/finetune/results.json").read_text())
    assert result["data"]["mode"] == "dpo" and result["data"]["train"]["kept"] + result["data"]["val"]["kept"] == 40
    pref = result["compare"]["preference"]
    assert pref["source"] == "validation pairs" and pref["pairs"] == result["data"]["val"]["kept"]
    for model in ("base", "finetuned"):
        assert 0 <= pref[model]["accuracy"] <= 1 and pref[model]["chosen_logp_per_token"] < 0
    assert pref["chosen_logp_drift"] == pytest.approx(
        pref["finetuned"]["chosen_logp_per_token"] - pref["base"]["chosen_logp_per_token"])
    assert pref["reward"]["beta"] == 0.1 and pref["reward"]["margin"] != 0
    # validation during training reports the preference loss and reward accuracy (a fraction of pairs)
    assert 0 <= result["train"]["last_val"]["acc"] <= 1
    assert set(summary_keys(result)) >= {"pref_acc_base", "pref_acc", "reward_acc", "chosen_logp_drift"}
    assert _run(base, tmp_path, "split", "--finetune.mode=dpo", f"--finetune.data={pairs}",
                "--finetune.stop_at=2") == 0
    assert _run(base, tmp_path, "split", "--finetune.mode=dpo", f"--finetune.data={pairs}") == 0
    weights = [load_file(str(tmp_path / n / "finetune/ckpt/step_000004/model.safetensors")) for n in ("whole", "split")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_lora_simpo_run_trains_only_adapters(base, pairs, tmp_path):
    assert _run(base, tmp_path, "simpo", "--finetune.mode=simpo", f"--finetune.data={pairs}",
                "--finetune.lora.rank=4") == 0
    result = json.loads((tmp_path / "simpo/finetune/results.json").read_text())
    assert result["compare"]["preference"]["reward"]["beta"] == 2.0
    assert result["adapter"] and result["train"]["steps"] == 4


def test_heldout_pairs_with_kinds_are_reported_per_kind(base, pairs, tmp_path):
    assert _run(base, tmp_path, "kinds", "--finetune.mode=dpo", f"--finetune.data={pairs}",
                f"--finetune.heldout_task={pairs}", "--finetune.steps=1") == 0
    pref = json.loads((tmp_path / "kinds/finetune/results.json").read_text())["compare"]["preference"]
    kinds = [json.loads(ln)["kind"] for ln in pairs.read_text(encoding="utf-8").splitlines()]
    assert pref["source"] == str(pairs) and pref["pairs"] == 40
    assert {k: v["pairs"] for k, v in pref["by_kind"].items()} == {k: kinds.count(k) for k in set(kinds)}
    # the kinds' accuracies, weighted by their pairs, make up the overall one
    for model in ("base", "finetuned"):
        assert sum(v[model] * v["pairs"] for v in pref["by_kind"].values()) / 40 == pytest.approx(pref[model]["accuracy"])
    summary = summary_keys({"compare": {"preference": pref}})
    assert summary["pref_acc_cut"] == pref["by_kind"]["cut"]["finetuned"]
    cut = pref["by_kind"]["cut"]
    row = [r for r in comparison_rows({"preference": pref}) if r[0].startswith("held-out pairs, cut")]
    assert row == [[f"held-out pairs, cut ({cut['pairs']}): preference accuracy", f"{cut['base']:.3f}",
                    f"{cut['finetuned']:.3f}", f"{cut['finetuned'] - cut['base']:+.3f}"]]


def test_preference_report_per_kind_by_hand():
    before = {"chosen": np.array([-1.0, -1.0, -4.0, -2.0]), "rejected": np.array([-2.0, -3.0, -1.0, -1.0]),
              "n_chosen": np.array([2.0, 2, 2, 2]), "n_rejected": np.array([2.0, 2, 2, 2])}
    after = {**before, "chosen": np.array([-1.0, -4.0, -0.5, -3.0])}
    report = preference_report(before, after, beta=0.5, kinds=["cut", "cut", "repeat", "repeat"])
    assert report["by_kind"] == {"cut": {"pairs": 2, "base": 1.0, "finetuned": 0.5},
                                 "repeat": {"pairs": 2, "base": 0.0, "finetuned": 0.5}}
    assert report["base"]["accuracy"] == 0.5 and report["finetuned"]["accuracy"] == 0.5
    assert report["reward"]["accuracy"] == 0.25  # only the third pair's chosen answer gained (+3.5 nats)
    assert report["reward"]["margin"] == pytest.approx(0.5 * (0 - 3 + 3.5 - 1) / 4)
    assert "by_kind" not in preference_report(before, after, beta=0.5)


GOOD = {"prompt": "Who speaks?", "chosen": "HAMLET.", "rejected": "OPHELIA."}


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Who speaks?", "chosen": "HAMLET."}, "the 'rejected' answer is missing"),
    ({"prompt": "Who speaks?", "chosen": "HAMLET.", "rejected": "HAMLET."}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "word " * 200, "chosen": "A.", "rejected": "B."}, "leaves no room for an answer"),
    ({"chosen": "A.", "rejected": "B."}, "a pair needs a non-empty 'prompt'"),
])
def test_bad_pairs_stop_with_file_and_line(base, tmp_path, capsys, row, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    assert _run(base, tmp_path, "bad", "--finetune.mode=dpo", f"--finetune.data={data}") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:2: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "bad/finetune/data/pairs_train.npz").exists()  # nothing half-written


def test_empty_file_and_skipped_lines(base, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert _run(base, tmp_path, "empty", "--finetune.mode=dpo", f"--finetune.data={empty}") == 1
    assert capsys.readouterr().err.startswith(f"error: {empty}: no preference pairs (the file is empty)")
    mixed = tmp_path / "mixed.jsonl"
    rows = [GOOD] * 12 + [{"prompt": "x", "chosen": "A."}, {**GOOD, "rejected": GOOD["chosen"]}, "not json"]
    mixed.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert _run(base, tmp_path, "skip", "--finetune.mode=dpo", f"--finetune.data={mixed}",
                "--finetune.on_bad_line=skip", "--finetune.steps=1") == 0
    read = json.loads((tmp_path / "skip/finetune/results.json").read_text())["data"]["read"]
    assert read["kept"] == 12 and read["skipped"] == {"no rejected": 1, "chosen == rejected": 1, "malformed JSON": 1}


def test_embedded_sets_are_as_built(capsys):
    assert build_set(["--check"]) == 0
    out = capsys.readouterr().out
    assert "pairs_train: ok" in out and "pairs_heldout: ok" in out
    assert "pairs_manifest: ok" in out
    sets = {name: [json.loads(s) for s in (EMBEDDED_DIR / f).read_text(encoding="utf-8").splitlines()]
            for name, f in (("train", PAIRS_TRAIN), ("val", PAIRS_VAL), ("heldout", PAIRS_HELDOUT))}
    rows = sets["train"]
    assert len(rows) == 1200 and all(r["chosen"] != r["rejected"] and r["prompt"] for r in rows)
    manifest = json.loads((EMBEDDED_DIR / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["kinds"]["pairs_train"] == {k: 240 for k in KINDS}
    assert manifest["kinds"]["pairs_heldout"] == {k: 40 for k in KINDS}
    for r in rows:
        line = r["prompt"].split(': "', 1)[1][:-1]  # the quoted line the prompt asks to continue
        if r["kind"] == "repeat":
            assert r["rejected"] == line
        elif r["kind"] == "cut":
            assert r["chosen"].startswith(r["rejected"])
            assert len(r["rejected"].split()) == len(r["chosen"].split()) - 1
        elif r["kind"] == "shuffled":
            assert sorted(r["rejected"].split()) == sorted(r["chosen"].split())

    def lines(name: str) -> set[str]:
        return {t for r in sets[name] for t in (r["prompt"].split(': "', 1)[1][:-1], r["chosen"], r["rejected"])}

    assert not lines("heldout") & (lines("train") | lines("val"))  # held-out pairs share no line with tuning
    chat = [json.loads(s) for f in (EMBEDDED_TRAIN, EMBEDDED_VAL) for s in (EMBEDDED_DIR / f).open(encoding="utf-8")]
    said = {m["content"] for c in chat for m in c["messages"] if m["role"] == "assistant"}
    assert not said & {r["chosen"] for rs in sets.values() for r in rs}  # no chosen line is a chat answer


def test_pipeline_dpo_stage_tunes_the_chat_model_and_reports(small_corpus, pairs, tmp_path):
    from tests.conftest import TINY

    args = ["run", "--config", str(TINY), f"--data.train={small_corpus}", f"--runs_dir={tmp_path}",
            "--model.context=96", "--train.steps=6", "--finetune.enabled=true", "--finetune.steps=2",
            "--finetune.batch_size=4", "--finetune.eval_batches=2", "--finetune.preference.stage=dpo",
            f"--finetune.preference.data=[{pairs}]", "--finetune.preference.steps=2",
            "--finetune.on_bad_line=skip", *QUIET]  # this tokenizer makes a few prompts too long for 96
    assert call_cli(*args) == 0
    run = tmp_path / "tiny"
    result = json.loads((run / "dpo" / "manifest.json").read_text())["outputs"]
    assert result["init"] == str(run / "finetune") and result["data"]["mode"] == "dpo"
    assert result["train"]["steps"] == 2 and result["compare"]["preference"]["pairs"] > 0
    chat_val = json.loads((run / "finetune" / "manifest.json").read_text())["outputs"]["compare"]["pretrain_val"]
    assert result["compare"]["pretrain_val"]["base"]["bpb"] == chat_val["finetuned"]["bpb"]  # its base: the chat model
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["dpo"]) >= {"pref_acc_base", "pref_acc", "reward_acc", "val_bpb_base", "val_bpb"}
    assert "## Preference tuning (dpo stage)" in (run / "report" / "card.md").read_text()
    from lmforge.report.compare_runs import load_run, results

    shown = results(load_run(run))  # the figures `lmforge compare` puts side by side
    assert shown["dpo.reward_acc"] == summary["dpo"]["reward_acc"] and "finetune.task_acc" in shown
