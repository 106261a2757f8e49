"""Chat fine-tuning of a downloaded-style Hugging Face folder (``lmforge finetune --init FOLDER``), in its own
chat template: Llama 3 (llama3 rotary scaling), Qwen2.5 and Gemma 3 are wrapped (``model.arch=hf``), trained
full and with PEFT's LoRA, and the loss falls exactly on the template's assistant spans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.chat import chat_spans
from lmforge.finetune.data import ChatLoader, load_examples
from lmforge.trained import load_model
from tests.data.test_chat_templates import family_folder
from tests.hf_families import FAMILIES as MODELS
from tests.in_process import call_cli

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--train.threads=1"]
# model family (tests/hf_families.py) -> tokenizer family and template (tests/data/test_chat_templates.py)
CASES = {"llama3": "llama3_1", "qwen2.5": "qwen2_5", "gemma3": "gemma3"}
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "gemma3": "<end_of_turn>"}
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare."}, {"role": "user", "content": "When?"},
     {"role": "assistant", "content": "About 1600."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}],
]


def hf_folder(model: str, root: Path) -> Path:
    """A random model of the family, with a tokenizer of the family's special tokens and its real template."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = CASES[model]
    folder = family_folder(family, root / model)
    tok = load_model_tokenizer(folder)
    config = MODELS[model].config()
    config.vocab_size, config.max_position_embeddings = 384, 256
    ends = sorted(set(tok.end_ids))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eot_id, tok.pad_id
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=ends, pad_token_id=tok.pad_id)
    hf.eval().save_pretrained(folder)
    return folder


def load_model_tokenizer(folder: Path):
    from lmforge.trained.hf import load_tokenizer

    return load_tokenizer(folder, {}, vocab_size=384)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    lines = [json.dumps({"messages": m}) for m in CONVERSATIONS]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "val.jsonl").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    return {"train": root / "train.jsonl", "val": root / "val.jsonl"}


def finetune(folder: Path, runs: Path, name: str, data: dict[str, Path], *extra: str) -> Path:
    assert call_cli("finetune", "--init", str(folder), f"--runs_dir={runs}", f"--name={name}",
                    f"--finetune.data={data['train']}", f"--finetune.val={data['val']}", "--finetune.steps=2",
                    "--finetune.batch_size=2", "--finetune.eval_batches=1", "--finetune.lr=1e-2",
                    "--finetune.warmup_steps=0", *QUIET, *extra) == 0
    return runs / name / "finetune"


def _runs(mask: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s, counted among the masked tokens only."""
    out, n, start = [], 0, None
    for m in [*mask, 0]:
        if m and start is None:
            start = n
        if m:
            n += 1
        elif start is not None:
            out.append((start, n))
            start = None
    return out


def expected_examples(folder: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    tok = load_model_tokenizer(folder)
    out = []
    for messages in CONVERSATIONS:
        ids, spans = chat_spans(tok, messages)
        mask = [0] * len(ids)
        for a, b in spans:
            mask[a:b] = [1] * (b - a)
        out.append((tuple(ids), tuple(mask)))
    return sorted(out)


@pytest.mark.parametrize("model", sorted(CASES))
def test_lora_chat_finetune_trains_on_the_templates_assistant_spans(model, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = hf_folder(model, tmp_path)
    base = load_model(folder)
    assert base.cfg.model.arch == "hf" and base.tokenizer.chat_template is not None
    out = finetune(folder, tmp_path, "lora", data, "--finetune.lora.rank=4", "--finetune.lora.alpha=8")
    assert json.loads((out / "results.json").read_text())["train"]["steps"] == 2
    # The examples written for training are the conversations with exactly the template's assistant spans.
    ids, mask, offsets = load_examples(out / "data" / "chat_train.npz")
    written = sorted((tuple(ids[a:b].tolist()), tuple(mask[a:b].tolist())) for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    assert written == expected_examples(folder)
    # Read independently of the template code: the trained runs are the replies, each with its end of turn.
    trained = sorted(base.tokenizer.decode([t for t, m in zip(ids_, mask_, strict=True) if m][a:b])
                     for ids_, mask_ in written for a, b in _runs(mask_))
    replies = sorted(m["content"] + END_OF_TURN[model] for c in CONVERSATIONS for m in c if m["role"] == "assistant")
    assert trained == replies
    # And the loader's targets are those tokens, each predicted from the one before.
    x, y = ChatLoader(out / "data", "train", batch_size=4, context=256, seed=0).next_batch()
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        full = next(e for e in written if list(e[0][:-1]) == row_x[: len(e[0]) - 1])
        targets = [t for t, m in zip(full[0][1:], full[1][1:], strict=True) if m]
        assert [t for t in row_y if t != -100] == targets
    # PEFT's own adapter files, loaded by PEFT onto the original folder, give lmforge's merged model.
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder)), str(adapter)).eval()
    tuned = load_model(out)
    idx = torch.tensor([list(written[0][0])[:40]])
    with torch.no_grad():
        ours, peft_logits, before = tuned.model(idx)[0], theirs(input_ids=idx).logits, base.model(idx)[0]
    assert (ours - before).abs().max() > 1e-4  # the adapters moved the model
    assert (ours - peft_logits).abs().max() < 1e-5  # fp32; merged vs. beside the weight: rounding only
    # The tuned model keeps the template and the begin-token rule, so serving renders as training did.
    assert tuned.tokenizer.chat_template == base.tokenizer.chat_template
    assert tuned.tokenizer.add_bos == base.tokenizer.add_bos and tuned.tokenizer.end_ids == base.tokenizer.end_ids


def test_full_chat_finetune_of_a_wrapped_model(data, tmp_path):
    folder = hf_folder("qwen2.5", tmp_path)
    out = finetune(folder, tmp_path, "full", data)
    tuned, base = load_model(out), load_model(folder)
    assert tuned.cfg.model.arch == "hf" and tuned.step == 2
    idx = torch.tensor([[5, 9, 40, 7]])
    with torch.no_grad():
        assert not torch.equal(tuned.model(idx)[0], base.model(idx)[0])
    ids, mask, _ = load_examples(out / "data" / "chat_train.npz")
    assert int(np.sum(mask)) == sum(sum(m) for _, m in expected_examples(folder))


def test_serving_prompt_is_the_template_and_generation_stops_at_its_end_of_turn(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.config import ServeConfig
    from lmforge.data.chat import render_chat
    from lmforge.serve.api import create_app
    from lmforge.serve.engine import Engine

    folder = hf_folder("llama3", tmp_path)
    tm = load_model(folder)
    eot = tm.tokenizer.token_to_id("<|eot_id|>")
    assert eot in tm.tokenizer.end_ids
    # A head that always prefers <|eot_id|> (untied, bias only): a greedy reply is that one token, then stops.
    head = torch.nn.Linear(tm.cfg.model.d_model, tm.cfg.model.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0
    tm.model.hf.lm_head = head
    messages = CONVERSATIONS[0][:2]
    prompt = render_chat(tm.tokenizer, messages)
    assert prompt[0] == tm.tokenizer.bos_id and prompt.count(tm.tokenizer.bos_id) == 1
    with TestClient(create_app(Engine(tm.model, tm.tokenizer), ServeConfig(), "m")) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["usage"]["prompt_tokens"] == len(prompt)
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"] == ""


def test_a_template_without_roles_is_refused_in_one_line_naming_the_folder(data, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = family_folder("qwen2_5", tmp_path / "no-roles", template="{% for m in messages %}{{ m['content'] }}\n"
                                                                      "{% endfor %}")
    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=256)).save_pretrained(folder)
    capsys.readouterr()  # what saving the folder printed
    assert call_cli("finetune", "--init", str(folder), f"--runs_dir={tmp_path}", "--name=bad",
                    f"--finetune.data={data['train']}", *QUIET) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and "cannot mark the assistant's tokens" in err
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def _train_losses(out: Path) -> list[float]:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m.get("kind") == "train"]


@pytest.mark.parametrize("model", ["llama3", "qwen2.5"])
def test_packed_and_unpacked_chat_finetuning_of_a_wrapped_model_give_the_same_losses(model, data, tmp_path):
    folder = hf_folder(model, tmp_path)
    args = ("--finetune.batch_size=4", "--finetune.steps=3", "--train.log_every=1", "--finetune.ckpt_every=0")
    runs = {pack: finetune(folder, tmp_path, f"pack-{pack}", data, f"--finetune.pack={pack}", *args)
            for pack in ("false", "true")}
    plain, packed = _train_losses(runs["false"]), _train_losses(runs["true"])
    assert len(plain) == len(packed) == 3 and plain[0] > 1
    assert max(abs(a - b) for a, b in zip(plain, packed, strict=True)) < 1e-5
    assert plain[0] != plain[-1]  # the model trained: the runs agree step after step, not only at the start
    assert json.loads((runs["true"] / "results.json").read_text())["packed"] is True
    assert json.loads((runs["false"] / "results.json").read_text())["packed"] is False


def test_auto_packs_a_wrapped_model_where_it_pays(data, tmp_path):
    """finetune.pack=auto (the default) decides from the data, as for the Transformer."""
    folder = hf_folder("qwen2.5", tmp_path)
    long = [{"role": "user", "content": "Tell me of Hamlet. " * 6}, {"role": "assistant", "content": "A prince. " * 6}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps({"messages": m}) for m in [*CONVERSATIONS[1:], long] * 2) + "\n")
    args = ("--finetune.batch_size=8", "--finetune.steps=1", "--finetune.ckpt_every=0")
    pays = finetune(folder, tmp_path, "pays", {"train": mixed, "val": data["val"]}, *args)
    # one batch of six short conversations and two long ones: padded to the longest, most positions are padding
    assert json.loads((pays / "results.json").read_text())["packed"] is True
    even = finetune(folder, tmp_path, "even", data, "--finetune.batch_size=1", "--finetune.steps=1")
    assert json.loads((even / "results.json").read_text())["packed"] is False  # one per batch: nothing to save
