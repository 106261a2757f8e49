"""Starting from Hugging Face checkpoints: tiny Llama and GPT-2 folders built here load into lmforge.

Run: ``.venv/bin/pytest -q tests/trained/test_hf_import.py``. Each model is a random
``LlamaForCausalLM`` / ``GPT2LMHeadModel`` (2 layers, width 64) built from a config
(no download) and saved with ``save_pretrained`` beside a byte-level BPE tokenizer
trained here. The checks: logits within 1e-4 of the original's, greedy decoding
through ``step`` equal to ``generate``, two training steps and a checkpoint round
trip, the GPT-2 export back, and one clear error per kind of bad folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmforge.config import ConfigError
from lmforge.data.tokenizer import Tokenizer
from lmforge.export import export
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.train.checkpoint import Checkpointer, CheckpointError
from lmforge.trained import load_model
from tests.in_process import call_cli

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 20
VOCAB = 320  # the model's vocabulary; the tokenizer holds a few tokens less, as real checkpoints may
SPECIALS = {"llama": {"bos_token": "<s>", "eos_token": "</s>"}, "gpt2": {"bos_token": "<|endoftext|>",
                                                                         "eos_token": "<|endoftext|>"}}


def save_tokenizer(kind: str, folder: Path) -> PreTrainedTokenizerFast:
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    specials = sorted(set(SPECIALS[kind].values()))
    inner.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, **SPECIALS[kind])
    fast.save_pretrained(folder)
    return fast


def perturb(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0: move them so a swapped or skipped one shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))


def build(kind: str, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    fast = save_tokenizer(kind, folder)
    ids = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id}
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, **ids)
        model = GPT2LMHeadModel(cfg)
    perturb(model)
    model.eval().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for kind in ("llama", "gpt2"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (folder, build(kind, folder))
    return out


def random_ids(n: int = 20, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(1))


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_and_tokenizer_match_the_original(kind, folders):
    folder, hf = folders[kind]
    tm = load_model(folder)
    t = tm.cfg.model.transformer
    assert (t.norm, t.pos, t.mlp, t.bias) == (("layernorm", "learned", "gelu", True) if kind == "gpt2"
                                              else ("rmsnorm", "rope", "swiglu", False))
    assert tm.cfg.model.vocab_size == VOCAB and tm.cfg.model.context == 64 and tm.step == 0
    idx = random_ids()
    with torch.no_grad():
        diff = (tm.model(idx)[0] - hf(input_ids=idx).logits).abs().max().item()
    assert diff < 1e-4
    # The model's own end-of-text token, not lmforge's fixed ids.
    fast = PreTrainedTokenizerFast.from_pretrained(folder)
    assert tm.tokenizer.eot_id == fast.eos_token_id == hf.config.eos_token_id
    assert tm.tokenizer.bos_id == fast.bos_token_id
    assert tm.tokenizer.encode(TEXT[:80]) == fast(TEXT[:80], add_special_tokens=False)["input_ids"]
    # eval / generate / serve open the folder through the same loader.
    assert load_model(folder).cfg.model == tm.cfg.model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_decoding_through_step_equals_generate(kind, folders):
    folder, hf = folders[kind]
    tm = load_model(folder)
    prompt = random_ids(n=7, rows=1)
    prompt[0, 0] = tm.tokenizer.bos_id  # a prompt that starts a document: the engine adds no second begin token
    new = 6
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=hf.config.eos_token_id)[0, 7:].tolist()
        logits, state = tm.model.step(prompt, tm.model.new_state(1))
        ours = []
        for _ in range(new):
            ours.append(int(logits[0, -1].argmax()))
            logits, state = tm.model.step(torch.tensor([[ours[-1]]]), state)
    assert ours == theirs
    # The serving engine (batched, KV cache) gives the same tokens when nothing stops it early.
    params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
    completion = Engine(tm.model, tm.tokenizer, device=None).generate([prompt[0].tolist()], params)[0]
    assert completion.token_ids == theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trains_and_round_trips_as_an_lmforge_checkpoint(kind, folders, tmp_path):
    folder, _ = folders[kind]
    tm = load_model(folder)
    model = tm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = random_ids(n=17, rows=4)
    losses = []
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[1] < losses[0]
    run = tmp_path / "run"
    tm.tokenizer.save(run / "tokenizer")
    Checkpointer(run / "train" / "ckpt", model, opt, {"step": 2, "config": tm.cfg.model_dump()}).write(2)
    back = load_model(run)
    assert back.step == 2 and back.cfg.model == tm.cfg.model
    assert back.tokenizer.eot_id == tm.tokenizer.eot_id and back.tokenizer.specials == tm.tokenizer.specials
    with torch.no_grad():
        assert torch.equal(back.model(idx)[0], model.eval()(idx)[0])  # same weights, same code path: bitwise


def test_pytorch_model_bin_is_read_too(tmp_path):
    hf = build("gpt2", tmp_path)
    # What older transformers wrote: a pickled state dict, with the causal-mask buffers of GPT-2's attention.
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    torch.save(state, tmp_path / "pytorch_model.bin")
    idx = random_ids()
    with torch.no_grad():
        assert (load_model(tmp_path).model(idx)[0] - hf(input_ids=idx).logits).abs().max().item() < 1e-4


def test_mistral_and_sharded_safetensors_load(folders, tmp_path):
    folder, hf = folders["llama"]
    mistral = copy(folder, tmp_path)
    # Mistral is Llama's layout plus a sliding window, exact when the context is no longer than the window.
    rewrite_config(mistral, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=32)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(mistral / "model.safetensors"))
    (mistral / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(mistral / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (mistral / "model.safetensors.index.json").write_text(json.dumps(index))
    tm = load_model(mistral)
    assert tm.cfg.model.context == 32
    idx = random_ids(n=32)
    with torch.no_grad():
        assert (tm.model(idx)[0] - hf(input_ids=idx).logits).abs().max().item() < 1e-4


def test_gpt2_exports_back_as_gpt2_with_equal_logits(folders, tmp_path):
    folder, hf = folders["gpt2"]
    tm = load_model(folder)
    result = export(tm, "hf", tmp_path / "out")  # check=True: transformers loads it, logits compared
    assert result["check"]["max_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] == [hf.config.eos_token_id]
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = random_ids()
    with torch.no_grad():
        assert (again(input_ids=idx).logits - hf(input_ids=idx).logits).abs().max().item() < 1e-4
    # An imported Llama, with its own </s>, goes back as Llama.
    result = export(load_model(folders["llama"][0]), "hf", tmp_path / "llama")
    assert result["check"]["max_logit_diff"] < 1e-4
    assert json.loads((tmp_path / "llama" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_exports_refuse_what_they_cannot_represent(folders, tmp_path):
    tm = load_model(folders["gpt2"][0])
    with pytest.raises(ConfigError, match=r"gguf: model.transformer.norm is 'layernorm'.*--format lmforge"):
        export(tm, "gguf", tmp_path / "x.gguf")
    tm.cfg = tm.cfg.model_copy(update={"model": tm.cfg.model.model_copy(
        update={"transformer": tm.cfg.model.transformer.model_copy(update={"mlp": "relu2"})})})
    with pytest.raises(ConfigError, match=r"norm is 'layernorm'.*Nor is it a GPT-2: model.transformer.mlp is 'relu2'"):
        export(tm, "hf", tmp_path / "hf")
    llama = load_model(folders["llama"][0])
    llama.cfg = llama.cfg.model_copy(update={"model": llama.cfg.model.model_copy(
        update={"transformer": llama.cfg.model.transformer.model_copy(update={"bias": True})})})
    with pytest.raises(ConfigError, match=r"gguf: model.transformer.bias is true"):
        export(llama, "gguf", tmp_path / "y.gguf")


def rewrite_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def drop_tensor(folder: Path, name: str, extra: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    if extra:
        tensors[name] = torch.zeros(3)
    else:
        del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


BAD = {
    "no config": ("llama", lambda f: (f / "config.json").unlink(), r"no config\.json"),
    "bert": ("llama", lambda f: rewrite_config(f, model_type="bert"), r"model_type 'bert' is an encoder-only"),
    # Qwen2 goes to the wrapper, which finds its query/key/value biases missing from Llama's weights.
    "qwen2": ("llama", lambda f: rewrite_config(f, model_type="qwen2"),
              r"model\.safetensors: no tensor for 'model\.layers\.0\.self_attn\.[kqv]_proj\.bias' \(and 5 more\)"),
    "unknown family": ("gpt2", lambda f: rewrite_config(f, model_type="nonesuch"),
                       r"model_type 'nonesuch' is not a model family transformers knows"),
    "no weights": ("gpt2", lambda f: (f / "model.safetensors").unlink(), r"no weights file"),
    "stray tensor": ("llama", lambda f: drop_tensor(f, "model.layers.0.extra.weight", extra=True),
                     r"model\.safetensors: tensor 'model\.layers\.0\.extra\.weight' has no counterpart"),
    "missing tensor": ("gpt2", lambda f: drop_tensor(f, "transformer.h.1.mlp.c_fc.bias"),
                       r"no tensor for lmforge's 'layers\.1\.mlp\.up\.bias'"),
    "shape": ("llama", lambda f: rewrite_config(f, intermediate_size=80),
              r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), but config\.json implies"),
    "no tokenizer": ("gpt2", lambda f: (f / "tokenizer.json").unlink(), r"no tokenizer\.json"),
    "tokenizer too big": ("llama", lambda f: rewrite_config(f, vocab_size=200),
                          r"tokenizer\.json has \d+ tokens but config\.json's vocab_size is 200"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_get_one_clear_error(case, folders, tmp_path):
    kind, spoil, message = BAD[case]
    folder = copy(folders[kind][0], tmp_path)
    spoil(folder)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_cli_generates_from_a_hf_folder_and_reports_errors(folders, tmp_path, capsys):
    folder = folders["gpt2"][0]
    assert call_cli("generate", str(folder), "--sample.max_new_tokens=5", '--sample.prompts=["To be"]') == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out.strip()) > len("To be")
    bad = copy(folder, tmp_path)
    rewrite_config(bad, model_type="bert")
    assert call_cli("generate", str(bad)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and "'bert'" in err


def test_imported_special_tokens_survive_save_and_load(folders, tmp_path):
    tm = load_model(folders["llama"][0])
    assert tm.tokenizer.specials["eos_token"] == "</s>" and tm.tokenizer.token_to_id("<|endoftext|>") is None
    back = Tokenizer.load(tm.tokenizer.save(tmp_path))
    assert (back.eot_id, back.bos_id, back.pad_id) == (tm.tokenizer.eot_id, tm.tokenizer.bos_id, tm.tokenizer.eot_id)
