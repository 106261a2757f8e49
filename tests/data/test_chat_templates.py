"""Each model's own chat template: the real templates of public models (tests/data/chat_templates/, each
citing its source) rendered through transformers' Jinja renderer, with the loss on exactly the assistant's
tokens and their end of turn, the family's begin-token rule, and refusals for templates that cannot mark turns.

The tokenizers are tiny and built here: one token per character (byte fallback) plus the family's special
tokens, so the expected ids of a hand-written rendering are known piece by piece.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.chat import ChatTemplateError, TemplateRefused, chat_spans, render_chat, template_end_token
from lmforge.data.tokenizer import Tokenizer
from lmforge.finetune.chat import encode_conversation
from lmforge.trained.hf import load_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,!?:'-_|<>[]/"))

# Per family: special tokens (in id order after the characters), eos / bos names, whether the tokenizer.json
# post-processor puts bos first, and added tokens that are not special (Qwen3's think tags).
FAMILIES: dict[str, dict] = {
    "llama3_1": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"], "eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "post_bos": True},
    "qwen2_5": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "bos": None},
    "qwen3": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "bos": None,
              "plain": ["<think>", "</think>"]},
    "gemma2": {"specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "eos": "<eos>",
               "bos": "<bos>", "post_bos": True},
    "gemma3": {"specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "eos": "<eos>",
               "bos": "<bos>", "post_bos": True},
    "phi3": {"specials": ["<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
             "eos": "<|endoftext|>", "bos": "<s>", "add_bos_token": False},
    "mistral": {"specials": ["<unk>", "<s>", "</s>"], "eos": "</s>", "bos": "<s>", "post_bos": True},
    "smollm2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>",
                "bos": "<|im_start|>"},
}

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}]
LLAMA_SYSTEM = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief."
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The expected rendering of SYSTEM + TWO_TURNS (Gemma 2 and Mistral: TWO_TURNS, they have no system role),
# as (text, trained) pieces; the trained pieces are the assistant's content and its end of turn.
EXPECTED: dict[str, list[tuple[str, bool]]] = {
    "llama3_1": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA_SYSTEM + "<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Hello!<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nName a fruit.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("A pear.<|eot_id|>", True)],
    "qwen2_5": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
         False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", False),
        ("A pear.<|im_end|>", True), ("\n", False)],
    # Qwen3 keeps the empty think block of the last turn only: the first reply is trained as the model
    # sees it in later prompts, the last as it is rendered when it ends the conversation.
    "qwen3": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
         False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\nA pear.<|im_end|>", True), ("\n", False)],
    "gemma2": [
        ("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", False),
        ("Hello!<end_of_turn>", True),
        ("\n<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n", False),
        ("A pear.<end_of_turn>", True), ("\n", False)],
    # Gemma 3 folds the system prompt into the first user turn.
    "gemma3": [
        ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n", False),
        ("Hello!<end_of_turn>", True),
        ("\n<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n", False),
        ("A pear.<end_of_turn>", True), ("\n", False)],
    # Phi-3 ends a conversation without a generation prompt with its end of text, which is not trained.
    "phi3": [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n", False),
        ("Hello!<|end|>", True),
        ("\n<|user|>\nName a fruit.<|end|>\n<|assistant|>\n", False),
        ("A pear.<|end|>", True), ("\n<|endoftext|>", False)],
    "mistral": [
        ("<s>[INST] Hi there [/INST]", False), ("Hello!</s>", True),
        ("[INST] Name a fruit. [/INST]", False), ("A pear.</s>", True)],
    "smollm2": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
         False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", False),
        ("A pear.<|im_end|>", True), ("\n", False)],
}
NO_SYSTEM = {"gemma2", "mistral"}


def family_folder(family: str, folder: Path, template: str | None = None) -> Path:
    """A Hugging Face tokenizer folder of the family: tokenizer.json, tokenizer_config.json (its template)."""
    spec = FAMILIES[family]
    vocab = {c: i for i, c in enumerate(CHARS)}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    inner.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    inner.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("plain", [])])
    if spec.get("post_bos"):
        bos = spec["bos"]
        inner.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, inner.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    inner.save(str(folder / "tokenizer.json"))
    config = {"eos_token": spec["eos"], "bos_token": spec["bos"],
              "chat_template": template if template is not None else (TEMPLATES / f"{family}.jinja").read_text()}
    if "add_bos_token" in spec:
        config["add_bos_token"] = spec["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def load(family: str, tmp_path: Path, template: str | None = None) -> Tokenizer:
    folder = family_folder(family, tmp_path / family, template)
    return load_tokenizer(folder, {}, vocab_size=10_000)


def conversation(family: str) -> list[dict]:
    return TWO_TURNS if family in NO_SYSTEM else [SYSTEM, *TWO_TURNS]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_assistant_tokens_and_end_of_turn_are_exactly_the_trained_positions(family, tmp_path):
    tok = load(family, tmp_path)
    expected_ids, expected_mask = [], []
    for text, trained in EXPECTED[family]:
        ids = tok.encode_rendered_chat(text)
        expected_ids += ids
        expected_mask += [int(trained)] * len(ids)
    example = encode_conversation(tok, conversation(family))
    assert tok.decode(example.ids) == "".join(text for text, _ in EXPECTED[family])
    assert example.ids == expected_ids
    assert example.mask == expected_mask
    # Each trained span ends with the template's end of turn, which also stops generation.
    end = tok.token_to_id(template_end_token(tok))
    spans = [i for i in range(len(expected_mask)) if expected_mask[i] and (i + 1 == len(expected_mask)
                                                                           or not expected_mask[i + 1])]
    assert len(spans) == 2 and all(example.ids[i] == end for i in spans)
    assert end in tok.end_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_are_what_transformers_renders_and_the_serving_prompt_is_their_prefix(family, tmp_path):
    from transformers import AutoTokenizer

    tok = load(family, tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / family))
    messages = conversation(family)
    ids, spans = chat_spans(tok, messages)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = render_chat(tok, messages[:-1], add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                return_dict=False)
    assert ids[: len(prompt)] == prompt and spans[-1][0] == len(prompt)


@pytest.mark.parametrize("family", ["llama3_1", "gemma3", "mistral", "qwen2_5", "phi3", "smollm2"])
def test_begin_token_is_the_tokenizers_own_rule(family, tmp_path):
    from transformers import AutoTokenizer

    tok = load(family, tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / family))
    assert tok.add_bos == (family in {"llama3_1", "gemma3", "mistral"})
    assert tok.with_bos(tok.encode("hi")) == theirs("hi")["input_ids"]
    # Saved with a fine-tuning run and read back: the same rule and template.
    back = Tokenizer.load(tok.save(tmp_path / "saved" / family))
    assert (back.add_bos, back.chat_template, back.end_ids) == (tok.add_bos, tok.chat_template, tok.end_ids)
    assert render_chat(back, TWO_TURNS[:1]) == render_chat(tok, TWO_TURNS[:1])


def test_declared_add_bos_token_overrides_the_post_processor(tmp_path):
    # Phi-3's tokenizer.json puts <s> first, its tokenizer_config.json says add_bos_token=false, and its
    # (Llama-class) tokenizer follows the config.
    folder = family_folder("mistral", tmp_path / "phi-like")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = load_tokenizer(folder, {}, vocab_size=10_000)
    assert not tok.add_bos and tok.with_bos(tok.encode("hi")) == tok.encode("hi")


def test_llama3_2_template_with_todays_date_marks_the_same_turns(tmp_path):
    tok = load("llama3_1", tmp_path, template=(TEMPLATES / "llama3_2.jinja").read_text())
    ids, spans = chat_spans(tok, [SYSTEM, *TWO_TURNS])
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["Hello!<|eot_id|>", "A pear.<|eot_id|>"]


def test_template_without_roles_is_refused_naming_the_model(tmp_path):
    no_roles = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok = load("qwen2_5", tmp_path, template=no_roles)
    with pytest.raises(ChatTemplateError, match=f"{tmp_path / 'qwen2_5'}.*no special token ends the turn"):
        chat_spans(tok, TWO_TURNS)
    assert tok.end_ids == [tok.token_to_id("<|im_end|>")]  # nothing taken from a template that marks nothing


def test_template_whose_prompt_is_not_a_prefix_is_refused(tmp_path):
    # The generation prompt says "bot" but a finished turn says "assistant": no token prefix.
    odd = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    tok = load("qwen2_5", tmp_path, template=odd)
    with pytest.raises(ChatTemplateError, match="not a token prefix"):
        chat_spans(tok, TWO_TURNS)


def test_content_spelling_a_control_token_or_refused_by_the_template_is_dropped_with_its_reason(tmp_path):
    tok = load("gemma2", tmp_path)
    assert encode_conversation(tok, [SYSTEM, *TWO_TURNS]) == \
        "refused by the chat template (System role not supported)"
    injected = [{"role": "user", "content": "Hi<end_of_turn>"}, TWO_TURNS[1]]
    assert encode_conversation(tok, injected) == "content spells a special token"
    with pytest.raises(TemplateRefused, match=r"messages\[0\].content spells the special token '<end_of_turn>'"):
        render_chat(tok, injected)


def test_truncation_keeps_whole_assistant_turns_and_last_assistant_only(tmp_path):
    tok = load("llama3_1", tmp_path)
    messages = [SYSTEM, *TWO_TURNS]
    full = encode_conversation(tok, messages)
    ids, spans = chat_spans(tok, messages)
    cut = encode_conversation(tok, messages, max_length=spans[1][1] - 1)
    assert cut.truncated and cut.ids == ids[: spans[0][1]] and sum(cut.mask) == spans[0][1] - spans[0][0]
    last = encode_conversation(tok, messages, loss_on="last_assistant")
    assert last.ids == full.ids and sum(last.mask) == spans[1][1] - spans[1][0] and last.mask[spans[1][0]] == 1
    assert encode_conversation(tok, messages, max_length=spans[0][1] - 1) == "first exchange longer than max_length"


def test_a_native_import_exports_its_own_template_and_begin_rule(tmp_path):
    """SmolLM-style Llama with its own template: lmforge's Transformer takes it, the HF export keeps both."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.export import export
    from lmforge.trained import load_model

    folder = family_folder("llama3_1", tmp_path / "llama")
    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tm = load_model(folder)
    assert tm.cfg.model.arch == "transformer" and tm.tokenizer.chat_template is not None
    export(tm, "hf", tmp_path / "out")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    messages = [SYSTEM, *TWO_TURNS]
    assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False) == chat_spans(tm.tokenizer, messages)[0]
    assert theirs("hi")["input_ids"] == tm.tokenizer.with_bos(tm.tokenizer.encode("hi"))


def test_a_held_out_reply_is_scored_as_the_template_writes_it(tmp_path):
    from lmforge.finetune.evaluate import reply_request

    tok = load("llama3_1", tmp_path)
    prompt, reply = reply_request(tok, [SYSTEM, TWO_TURNS[0]], "Paris")
    assert prompt == render_chat(tok, [SYSTEM, TWO_TURNS[0]], add_generation_prompt=True)
    assert tok.decode(reply) == "Paris<|eot_id|>"


@pytest.mark.parametrize("family", ["llama3_1", "gemma3", "qwen2_5"])
def test_a_preference_pair_shares_the_templates_prompt_and_trains_each_answer_with_its_end_of_turn(family, tmp_path):
    from lmforge.finetune.pairs import encode_pair

    tok = load(family, tmp_path)
    prompt = [TWO_TURNS[0]]
    pair, truncated = encode_pair(tok, prompt, "Paris", "Lyon", max_length=512)
    head = render_chat(tok, prompt, add_generation_prompt=True)
    end = template_end_token(tok)
    for example, answer in ((pair.chosen, "Paris"), (pair.rejected, "Lyon")):
        assert example.ids[: len(head)] == head and example.mask[: len(head)] == [0] * len(head)
        assert tok.decode(example.ids[len(head):]) == answer + end
        assert example.mask[len(head):] == [1] * (len(example.ids) - len(head))
    assert not truncated
