"""Preference tuning through the CLI: DPO and SimPO runs, exact resume, the before/after figures, bad input."""

from __future__ import annotations

import json
import math
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


# ------------------------------------------------------------------ models wrapped from Hugging Face
WRAPPED_PAIRS = [
    {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "Marlowe, I think."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
     "chosen": "Blue.", "rejected": "It is green, mostly, on Tuesdays."},
]


@pytest.fixture(scope="module")
def wrapped_qwen(tmp_path_factory) -> Path:
    """A random Qwen2.5 folder with the family's real chat template (tests/data/chat_templates/qwen2_5.jinja)."""
    from tests.finetune.test_finetune_hf_chat import hf_folder

    return hf_folder("qwen2.5", tmp_path_factory.mktemp("wrapped"))


def _wrapped_batch(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs, encoded in the model's template as a preference run encodes them: chosen rows, then rejected."""
    from lmforge.finetune.data import PairLoader
    from lmforge.finetune.pairs import check_pair, encode_pair, save_pairs
    from lmforge.trained import load_model

    tok = load_model(folder).tokenizer
    pairs = [encode_pair(tok, *check_pair(r)[0], 128)[0] for r in WRAPPED_PAIRS]
    save_pairs(pairs, folder.parent / "pairs_train.npz")
    return PairLoader(folder.parent, "train", batch_size=len(pairs), context=128, seed=0).next_batch()


@pytest.mark.parametrize("lora", [True, False])
def test_reference_of_a_wrapped_model_is_the_starting_model(wrapped_qwen, lora):
    """LoRA through PEFT: the base with PEFT's adapters disabled (one copy of the weights); full: a frozen copy."""
    from lmforge.config import LoraConfig
    from lmforge.train import lora as lora_lib
    from lmforge.train.preference import PreferenceObjective, frozen_copy, sequence_logprobs
    from lmforge.trained import load_model

    x, y = _wrapped_batch(wrapped_qwen)
    start = load_model(wrapped_qwen).model
    with torch.no_grad():
        expected = sequence_logprobs(start(x)[0], y)[0]
    model = load_model(wrapped_qwen).model
    if lora:
        lora_lib.attach_lora(model, LoraConfig(rank=4, alpha=8))
        objective = PreferenceObjective(model, "dpo", 0.1, adapters_off=lambda: lora_lib.adapters_disabled(model))
    else:
        objective = PreferenceObjective(model, "dpo", 0.1, reference=frozen_copy(model))
    with torch.no_grad():  # move the policy away from where it started
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        moved = sequence_logprobs(model(x)[0], y)[0]
        reference = objective._reference_logprobs(x, y)
    assert (moved - expected).abs().max() > 1e-3  # the policy has moved ...
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)  # ... the reference has not
    assert lora == lora_lib.has_lora(model) and all(p.requires_grad for p in model.parameters() if p.requires_grad)
    margins, loss = objective(x, y)
    assert margins.shape == (len(WRAPPED_PAIRS),) and margins.abs().max() > 0 and loss.requires_grad


@pytest.mark.parametrize("extra", [("--finetune.lora.rank=4",), ()], ids=["lora", "full"])
def test_dpo_on_a_wrapped_model_in_its_own_template(wrapped_qwen, tmp_path, extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in WRAPPED_PAIRS * 3), encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in WRAPPED_PAIRS), encoding="utf-8")
    assert call_cli("finetune", "--init", str(wrapped_qwen), f"--runs_dir={tmp_path}", "--name=dpo",
                    "--finetune.mode=dpo", f"--finetune.data={data}", f"--finetune.val={val}", "--finetune.batch_size=4",
                    "--finetune.steps=3", "--finetune.lr=1e-2", "--finetune.warmup_steps=0", "--train.log_every=1",
                    "--finetune.eval_batches=1", "--finetune.ckpt_every=0", *QUIET, *extra) == 0
    out = tmp_path / "dpo" / "finetune"
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if m.get("kind") == "train"]
    # Step 0: the policy is the reference, so every margin is 0 and the loss is -log sigmoid(0) = ln 2; a
    # reference that followed the policy (adapters never switched off) would keep it there at every step.
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[-1] - math.log(2)) > 1e-4
    result = json.loads((out / "results.json").read_text())
    assert result["data"]["mode"] == "dpo" and result["data"]["train"]["kept"] == 12
    pref = result["compare"]["preference"]
    assert pref["pairs"] == 4 and pref["reward"]["beta"] == 0.1
    for model in ("base", "finetuned"):
        assert 0 <= pref[model]["accuracy"] <= 1 and pref[model]["chosen_logp_per_token"] < 0
    assert pref["reward"]["margin"] != 0 and bool(result.get("adapter")) == bool(extra)
    assert set(summary_keys(result)) >= {"pref_acc_base", "pref_acc", "reward_acc", "chosen_logp_drift"}
    rows = [r[0] for r in comparison_rows(result["compare"])]  # the run card's before/after table
    assert "held-out pairs (4): preference accuracy (chosen more likely)" in rows
