"""Exports of models opened from Hugging Face folders: back to their own family, to GGUF, to lmforge's format.

Run: ``pytest tests/export/test_export_hf_families.py``. Each family of tests/hf_families.py is
exported with ``lmforge export --format hf`` and reloaded by transformers; the logits must equal
those of the original folder within 1e-5 (float32; the same weights through the same code).
GGUF: the Llama family, Llama 3's scaled rotary positions included, checked by reading the file
back into a NumPy forward pass with llama.cpp's conventions (lmforge.export.gguf_check).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.export.gguf_check import read_gguf, reference_logits
from lmforge.export.hf import CHECK_TEXT
from lmforge.trained import load_model
from tests.hf_families import FAMILIES, TEXT, reference
from tests.in_process import call_cli


def export(folder, out, fmt: str, capsys) -> int:
    code = call_cli("export", str(folder), "--format", fmt, "--out", str(out))
    capsys.readouterr()
    return code


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_export_hf_reloads_in_transformers_with_equal_logits(name, hf_family_folders, tmp_path, capsys):
    folder, out = hf_family_folders[name], tmp_path / "hf"
    assert export(folder, out, "hf", capsys) == 0
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (back(input_ids=idx).logits - reference(folder)(input_ids=idx).logits).abs().max()
    assert float(diff) <= 1e-5
    theirs, ours = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(out))
    assert ours(TEXT[:200], add_special_tokens=False)["input_ids"] == theirs(TEXT[:200], add_special_tokens=False)["input_ids"]
    config = json.loads((out / "config.json").read_text())
    family = FAMILIES[name]
    if family.arch == "hf":  # written back as its own family, stopping at its own end tokens
        assert config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
        ends = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        assert ours.convert_tokens_to_ids(family.end_of_turn) in ends and ours.eos_token_id in ends


def test_export_lmforge_of_a_wrapped_model_loads_back(hf_family_folders, tmp_path, capsys):
    folder = hf_family_folders["gemma3"]
    assert export(folder, tmp_path / "native", "lmforge", capsys) == 0
    back, tm = load_model(tmp_path / "native"), load_model(folder)
    idx = torch.tensor([tm.tokenizer.encode(CHECK_TEXT)])
    assert back.cfg.model.arch == "hf" and torch.equal(back.model(idx)[0], tm.model(idx)[0])


def test_gguf_of_a_llama3_holds_its_scaled_rotary_positions(hf_family_folders, tmp_path, capsys):
    folder, out = hf_family_folders["llama3"], tmp_path / "llama3.gguf"
    assert call_cli("export", str(folder), "--format", "gguf", "--out", str(out)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["max_logit_diff"] <= 1e-4  # the file's own forward against lmforge's (f32)
    meta, tensors = read_gguf(out)
    tm = load_model(folder)
    # llama.cpp divides each rotary frequency by its factor: transformers' llama3 frequencies, independently.
    plain = 500000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # head_dim 8, rope_theta 500000
    scaled = tm.model.hf.model.rotary_emb.inv_freq.double()
    np.testing.assert_allclose(tensors["rope_freqs.weight"], (plain / scaled).numpy(), rtol=1e-5)
    assert 1.0 < tensors["rope_freqs.weight"][0] < 8.0 == tensors["rope_freqs.weight"][-1]  # blended and slowed
    ids = tm.tokenizer.encode(CHECK_TEXT)[:40]
    with torch.no_grad():
        ours = tm.model(torch.tensor([ids]))[0][0].double().numpy()
    unscaled = {k: v for k, v in tensors.items() if k != "rope_freqs.weight"}
    # Without them it is wrong by far more than float rounding (the f32 check agrees to ~2e-7).
    assert np.abs(reference_logits(meta, unscaled, ids) - ours).max() > 1e-4


def test_gguf_refuses_a_family_it_does_not_write(hf_family_folders, tmp_path, capsys):
    folder, out = hf_family_folders["qwen3"], tmp_path / "qwen3.gguf"
    assert call_cli("export", str(folder), "--format", "gguf", "--out", str(out)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "model_type is 'qwen3'" in err[0] and "--format hf" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
