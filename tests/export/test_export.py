"""Export round trips: Hugging Face (transformers loads it), GGUF (read back, run in NumPy), lmforge's own.

Run: ``.venv/bin/pytest tests/export/test_export.py``. Models are tiny random ones saved as real
run checkpoints (tests/serving.py); transformers runs offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.data.chat import render_chat
from lmforge.data.tokenizer import train_tokenizer
from lmforge.export import export
from lmforge.export.gguf import permute_rotary, unpermute_rotary
from lmforge.export.gguf_check import read_gguf, reference_logits
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import load_model
from tests.conftest import file_modes, run_cli
from tests.serving import make_run

TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    # Grouped-query attention and an untied head: the harder mapping cases.
    return {"transformer": make_run(root, context=64, tie_embeddings=False,
                                    transformer={"n_heads": 4, "n_kv_heads": 2}),
            "gru": make_run(root, "gru")}


def test_hf_round_trip_logits_generation_and_chat_template(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tm = load_model(runs["transformer"])
    out = tmp_path / "hf"
    result = export(tm, "hf", out)
    assert result["check"]["max_logit_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = tm.tokenizer.encode(TEXT)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=torch.tensor([ids])).logits, tm.model(torch.tensor([ids]))[0],
                                   atol=1e-4, rtol=0)
        # The same text prompted both ways: the exported tokenizer puts the begin token first, as the engine does.
        prompt = tm.tokenizer.decode(ids[:8])
        hf_ids = hf_tok(prompt)["input_ids"]
        assert hf_ids == tm.tokenizer.with_bos(tm.tokenizer.encode(prompt)) and hf_ids[0] == tm.tokenizer.bos_id
        greedy = hf.generate(torch.tensor([hf_ids]), max_new_tokens=20, do_sample=False)[0, len(hf_ids):].tolist()
    [ours] = Engine(tm.model, tm.tokenizer).generate([prompt], SamplingParams(
        temperature=0, max_new_tokens=20))  # stops at every end token, as transformers does
    stops = set(tm.tokenizer.end_ids)
    assert greedy[: len(ours.token_ids)] == ours.token_ids
    assert len(greedy) == len(ours.token_ids) or greedy[len(ours.token_ids)] in stops
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    templated = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    assert list(templated) == tm.tokenizer.with_bos(render_chat(tm.tokenizer, messages))
    # ... and lmforge reads the folder back (lmforge serve DIR).
    back = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(back.model(torch.tensor([ids]))[0], tm.model(torch.tensor([ids]))[0])


def test_gguf_export_by_command_reads_back_and_runs(runs, tmp_path):
    out = tmp_path / "model.gguf"
    r = run_cli("export", str(runs["transformer"]), "--format", "gguf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["check"]["max_logit_diff"] < 1e-4
    tm = load_model(runs["transformer"])
    meta, tensors = read_gguf(out)
    cfg = tm.cfg.model
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == cfg.context
    assert (meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) \
        == (2, 4, 2)
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == tm.tokenizer.vocab_size
    assert meta["tokenizer.ggml.tokens"][:4] == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3] and len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.eos_token_id"] == tm.tokenizer.token_to_id("<|im_end|>")
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    # The begin-token rule (Tokenizer.add_bos): llama.cpp puts <|endoftext|> first, as lmforge's scoring does.
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.bos_token_id"] == tm.tokenizer.bos_id == tm.tokenizer.eot_id
    assert len(tensors) == 2 + 9 * cfg.n_layers + 1  # embedding, final norm, per-layer tensors, untied output
    assert tensors["blk.0.attn_k.weight"].shape == (16, 32)  # 2 kv heads x head_dim 8, d_model 32
    # The rotary row permutation is the one llama.cpp expects; undone, it gives back our weights.
    np.testing.assert_array_equal(unpermute_rotary(tensors["blk.1.attn_q.weight"], 4),
                                  tm.model.layers[1].attn.q.weight.detach().numpy())
    ids = tm.tokenizer.encode(TEXT)
    with torch.no_grad():
        ours = tm.model(torch.tensor([ids]))[0][0].double().numpy()
    np.testing.assert_allclose(reference_logits(meta, tensors, ids), ours, atol=1e-4, rtol=0)


def test_gguf_q8_0_quantizes_matrices_only(runs, tmp_path):
    import gguf

    tm = load_model(runs["transformer"])
    q8 = export(tm, "gguf", tmp_path / "q8.gguf", gguf_type="q8_0")
    f32 = export(tm, "gguf", tmp_path / "f32.gguf", check=False)
    assert q8["check"]["max_logit_diff"] < 0.1 * q8["check"]["max_logit"]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert q8["files"]["q8.gguf"] < 0.4 * f32["files"]["f32.gguf"]  # about 1 byte a weight instead of 4
    _, quantized = read_gguf(tmp_path / "q8.gguf")
    up = tm.model.layers[0].mlp.up.weight.detach().numpy()
    assert np.abs(quantized["blk.0.ffn_up.weight"] - up).max() <= np.abs(up).max() / 127  # half a step per block


def test_rotary_permutation_is_invertible():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    assert permute_rotary(w, 6)[1].tolist() == w[4].tolist()  # row 1 = second half's first row of head 0


def test_refusals_are_clear(runs, tmp_path):
    gru = load_model(runs["gru"])
    for fmt in ("hf", "gguf"):
        with pytest.raises(ConfigError, match="model.arch is 'gru'.*--format lmforge"):
            export(gru, fmt, tmp_path / fmt)
    tm = load_model(runs["transformer"])
    tm.tokenizer = train_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    with pytest.raises(ConfigError, match="byte-level BPE"):
        export(tm, "gguf", tmp_path / "char.gguf")
    r = run_cli("export", str(runs["gru"]), "--format", "hf", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--format lmforge" in r.stderr and "Traceback" not in r.stderr


def test_native_export_reloads_any_architecture(runs, tmp_path):
    tm = load_model(runs["gru"])
    result = export(tm, "lmforge", tmp_path / "gru")
    assert result["check"]["max_logit_diff"] == 0.0
    back = load_model(tmp_path / "gru")
    assert back.cfg.model.arch == "gru" and back.tokenizer.vocab_size == tm.tokenizer.vocab_size
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[])
    assert Engine(back.model, back.tokenizer).generate(["Hi"], params)[0].token_ids == \
        Engine(tm.model, tm.tokenizer).generate(["Hi"], params)[0].token_ids


def test_exports_get_the_umask_mode_and_equal_weights_give_equal_bytes(runs, tmp_path, umask):
    """safetensors' own writer leaves weights at 0600 whatever the umask; every file here gets the umask's mode."""
    from lmforge.export.gguf import export_gguf
    from lmforge.export.hf import export_hf
    from lmforge.export.native import export_native

    tm = load_model(runs["transformer"])
    for name in ("hf", "hf-again"):
        export_hf(tm, tmp_path / name)
    export_gguf(tm, tmp_path / "gguf" / "model.gguf")
    export_native(tm, tmp_path / "lmforge")
    modes = file_modes(tmp_path)
    assert {"hf/model.safetensors", "gguf/model.gguf", "lmforge/model.safetensors"} <= set(modes)
    assert modes == dict.fromkeys(modes, umask)
    assert (tmp_path / "hf/model.safetensors").read_bytes() == (tmp_path / "hf-again/model.safetensors").read_bytes()
