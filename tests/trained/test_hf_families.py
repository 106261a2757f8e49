"""Hugging Face folders of the common families through lmforge's verbs: generate, fine-tune, bad input.

Run: ``pytest tests/trained/test_hf_families.py``. Tiny random models of each family
(tests/hf_families.py, nothing downloaded); greedy text must equal transformers' own
``generate`` from the same prompt ids, token for token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.trained import load_model
from tests.hf_families import FAMILIES, TEXT, reference_greedy, save_tokenizer
from tests.in_process import call_cli

PROMPT = "To be, or not"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_equals_transformers_generate(name, hf_family_folders, capsys):
    folder = hf_family_folders[name]
    tm = load_model(folder)
    tok = tm.tokenizer
    family = FAMILIES[name]
    ends = {tok.token_to_id(family.specials["eos_token"]), tok.token_to_id(family.end_of_turn or "")} - {None}
    assert ends <= set(tok.end_ids)  # the family's end of text and end of turn both stop generation
    expected = reference_greedy(folder, tok.with_bos(tok.encode(PROMPT)), 12, tok.end_ids)
    assert call_cli("generate", str(folder), "--sample.temperature=0", "--sample.max_new_tokens=12",
                    f"--sample.prompts=[{PROMPT!r}]") == 0
    assert capsys.readouterr().out == PROMPT + tok.decode(expected, skip_special_tokens=True) + "\n\n"


def test_full_finetune_of_a_wrapped_qwen_lowers_the_loss(hf_family_folders, tmp_path, capsys):
    """The training loop runs on the wrapper unchanged: lmforge's loss from ``forward(idx, targets)``."""
    text = tmp_path / "hamlet.txt"
    text.write_text(TEXT * 4, encoding="utf-8")
    assert call_cli("finetune", "--init", str(hf_family_folders["qwen2.5"]), "--name=ft", f"--runs_dir={tmp_path}",
                    "--finetune.mode=text", f"--finetune.data={text}", "--finetune.steps=8", "--finetune.lr=3e-3",
                    "--finetune.warmup_steps=0", "--finetune.max_length=32", "--finetune.batch_size=4",
                    "--finetune.eval_every=0", "--finetune.eval_batches=2", "--train.log_every=1") == 0
    capsys.readouterr()
    log = [json.loads(line) for line in (tmp_path / "ft" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 0.3
    tuned = load_model(tmp_path / "ft")  # the fine-tuned checkpoint rebuilds the same family
    assert tuned.cfg.model.arch == "hf" and type(tuned.model.hf).__name__ == "Qwen2ForCausalLM"


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(folder)


def _t5(folder: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=320, d_model=32, d_ff=32, d_kv=8, num_layers=1,
                                        num_heads=2)).save_pretrained(folder)


def _mamba(folder: Path) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(vocab_size=320, hidden_size=16, state_size=4, num_hidden_layers=2,
                                 eos_token_id=0)).save_pretrained(folder)


BAD = {  # case -> (how the folder is made from a good one, what the error says)
    "encoder-only": (_bert, "model_type 'bert' is an encoder-only (masked language) model"),
    "seq2seq": (_t5, "model_type 't5' is an encoder-decoder (sequence-to-sequence) model"),
    "no step-by-step decoding": (_mamba, "MambaForCausalLM cannot decode step by step"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_fail_through_the_cli_with_one_line(case, hf_family_folders, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(hf_family_folders["qwen3"], folder)
    make, message = BAD[case]
    if case in ("encoder-only", "seq2seq", "no step-by-step decoding"):  # another model, the same tokenizer
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            (folder / f).unlink()
        torch.manual_seed(0)
        save_tokenizer(FAMILIES["qwen3"], folder)
    make(folder)
    capsys.readouterr()  # transformers' own progress output while the folder was made
    out = tmp_path / "export"
    for verb in (["generate", str(folder), "--sample.max_new_tokens=2"],
                 ["export", str(folder), "--format", "hf", "--out", str(out)]):
        assert call_cli(*verb) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(folder) in err[0] and message in err[0], err
    assert not out.exists()  # nothing half-written
