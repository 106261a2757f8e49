"""Evaluation tasks: hand-computed acc/acc_norm, exact log-likelihoods, answers, shipped tasks, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.config import ConfigError, ModelConfig, TokenizerConfig
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import Tokenizer, train_tokenizer
from lmforge.eval.perplexity import evaluate_text
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import (
    evaluate_tasks,
    exact_match,
    load_task,
    normalize_answer,
    run_task,
    token_f1,
)
from lmforge.models import build_model
from lmforge.serve.engine import Engine, SamplingParams
from tests.conftest import TINY
from tests.in_process import call_cli

# A unigram "model" over bytes: the next byte's probability ignores the context.
PROBS = {"a": 0.5, "b": 0.25, "c": 0.125}
VOCAB = 257  # 256 bytes + end-of-text


class ByteTokenizer:
    eot_id = bos_id = 256
    end_ids = [256]
    add_bos = True
    with_bos = Tokenizer.with_bos  # lmforge's begin-token rule, on this toy vocabulary
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Unigram(nn.Module):
    def __init__(self):
        super().__init__()
        rest = (1 - sum(PROBS.values())) / (VOCAB - len(PROBS))
        p = torch.full((VOCAB,), rest)
        for ch, q in PROBS.items():
            p[ord(ch)] = q
        self.register_buffer("logits", p.log())

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, VOCAB).clone(), None  # (B, T, V)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_acc_and_acc_norm_on_a_hand_made_set(tmp_path: Path):
    items = [
        {"context": "", "choices": ["a", "bb"], "label": 0},  # ll -0.69 vs -2.77; per char -0.69 vs -1.39
        {"context": "x", "choices": ["aaaa", "c"], "label": 1},  # ll -2.77 vs -2.08 (right); per char -0.69 wins
        {"context": "", "choices": ["bc", "aab"], "label": 1},  # ll -3.47 vs -2.77; per char -1.73 vs -0.92
        {"context": "yy", "choices": ["cc", "b"], "label": 0},  # ll -4.16 vs -1.39; per char -2.08 vs -1.39
    ]
    task = load_task(str(write_jsonl(tmp_path / "hand.jsonl", items)))
    result, details = run_task(task, Unigram(), ByteTokenizer(), context=8)
    assert (result["acc"], result["acc_norm"], result["acc_bytes"], result["chance"]) == (0.75, 0.5, 0.5, 0.5)
    ln = {ch: math.log(q) for ch, q in PROBS.items()}
    assert details[1]["loglikelihoods"] == pytest.approx([4 * ln["a"], ln["c"]], abs=1e-5)
    assert details[2]["loglikelihoods"] == pytest.approx([ln["b"] + ln["c"], 2 * ln["a"] + ln["b"]], abs=1e-5)
    assert [d["pred"] for d in details] == [0, 1, 1, 1]


@pytest.fixture(scope="module")
def tiny_lm():
    """A randomly initialised Transformer with a small trained BPE tokenizer: real model, real tokenizer."""
    from lmforge.data.sources import embedded_corpus

    text = next(d.text for d in embedded_corpus() if d.id == "sonnets")
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), [text])
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", context=32, d_model=32, n_layers=2,
                                    vocab_size=tok.vocab_size, transformer={"n_heads": 2})).eval()
    return model, tok


def _direct(model, ids: list[int], first: int) -> float:
    """log P(ids[first:] | ids[:first]) from one forward pass (the sequence fits the context)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))


def test_loglikelihood_matches_a_direct_forward_and_ignores_batching(tiny_lm):
    model, tok = tiny_lm
    pairs = [("Shall I compare thee", " to a summer's day?"), ("", "Thou art more lovely"),
             ("When in disgrace with fortune ", "and men's eyes"),  # trailing space moves to the continuation
             ("Music to hear, why hear'st thou music sadly? Sweets with sweets war not, joy delights in joy."
              " Why lov'st thou that which thou receiv'st not gladly,", " Or else receiv'st with pleasure"
              " thine annoy? If the true concord of well-tuned sounds")]  # longer than the 32-token window
    one = Scorer(model, tok, context=32, batch_size=1).loglikelihood(pairs)
    many = Scorer(model, tok, context=32, batch_size=7).loglikelihood(pairs)
    assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in many], abs=1e-4)
    for (ctx, cont), (lp, _) in zip(pairs[:3], one[:3], strict=True):
        c = tok.encode(ctx.rstrip()) if ctx else []
        whole = tok.encode(ctx + cont)
        assert whole[:len(c)] == c
        assert lp == pytest.approx(_direct(model, [tok.eot_id, *whole], 1 + len(c)), abs=1e-4)
    text = pairs[3][0] + pairs[3][1]
    rolling = Scorer(model, tok, context=32).rolling([text])[0]
    assert rolling == pytest.approx(-evaluate_text(model, tok, text, context=32)["nats"], abs=1e-3)


def test_generation_task_scores_the_engines_greedy_answers(tiny_lm, tmp_path: Path):
    model, tok = tiny_lm
    prompts = ["From fairest creatures we desire", "When forty winters shall besiege"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop=["\n"])
    outs = Engine(model, tok).generate([[tok.eot_id, *tok.encode(p)] for p in prompts], params)
    first_word = outs[0].text.split()[0] if outs[0].text.split() else ""
    spec = tmp_path / "gen.yaml"
    write_jsonl(tmp_path / "gen.jsonl", [{"prompt": prompts[0], "answers": ["zzz", first_word.upper()]},
                                         {"prompt": prompts[1], "answer": "certainly not this"}])
    spec.write_text("kind: generate\ndata: gen.jsonl\nmax_new_tokens: 6\nstop: ['\\n']\nanswer_regex: '\\S+'\n")
    [record] = evaluate_tasks(model, tok, 32, [str(spec)], out_dir=tmp_path / "out")
    assert (record["task"], record["items"], record["exact_match"]) == ("gen", 2, 0.5)
    details = [json.loads(line) for line in (tmp_path / "out" / "gen.jsonl").read_text().splitlines()]
    assert [d["completion"] for d in details] == [o.text for o in outs]


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("the Question:", "question") == 1.0
    assert exact_match("questions", "question") == 0.0
    assert token_f1("the big cat", "a big dog") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("word", "") == 0.0


def test_shipped_tasks_load_and_are_rebuilt_identically():
    from lmforge.eval.task_files import build

    sizes = {name: len(load_task(name).items) for name in ("speaker", "minimal_pairs", "cloze")}
    assert sizes == {"speaker": 100, "minimal_pairs": 100, "cloze": 60}
    assert load_task("speaker").kind == "multiple_choice" and load_task("cloze").kind == "generate"
    assert build.main(["--check"]) == 0
    labels = np.array([it["label"] for it in load_task("minimal_pairs").items])
    assert 0.3 < labels.mean() < 0.7  # the original line is not always first


@pytest.mark.parametrize("rows, needle", [
    ([{"context": "a", "choices": ["x", "y"], "label": 0}, {"context": "b", "choices": ["x", "y"]}],
     "bad.jsonl:2: missing field 'label'"),
    ([{"context": "a", "choices": ["x", "y"], "label": 2}], "bad.jsonl:1: field 'label' is 2, out of range"),
    ([{"context": "a", "choices": ["x"], "label": 0}], "bad.jsonl:1: field 'choices' must be a list of at least 2"),
    ([{"context": 3, "choices": ["x", "y"], "label": 0}], "bad.jsonl:1: field 'context' must be a string"),
    ([{"prompt": "p"}], "bad.jsonl:1: missing field 'answers'"),
    (["not an object"], "bad.jsonl:1: an item must be a JSON object"),
])
def test_bad_items_name_file_line_and_field(tmp_path: Path, rows, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(")):
        load_task(str(write_jsonl(tmp_path / "bad.jsonl", rows)))


def test_bad_specs_and_unknown_tasks(tmp_path: Path):
    (tmp_path / "broken.jsonl").write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_task(str(tmp_path / "broken.jsonl"))
    spec = tmp_path / "t.yaml"
    spec.write_text("kind: multiple_choice\ndata: missing.jsonl\n")
    with pytest.raises(DataError, match="field 'data': file not found"):
        load_task(str(spec))
    spec.write_text("kind: multiple_choice\nitems: [{context: '', choices: [a, b], label: 0}]\nlimit: 3\n")
    with pytest.raises(DataError, match="unknown field 'limit'"):
        load_task(str(spec))
    spec.write_text("kind: quiz\nitems: []\n")
    with pytest.raises(DataError, match="field 'kind' must be one of"):
        load_task(str(spec))
    with pytest.raises(ConfigError, match="'spekaer' is neither a task shipped with lmforge"):
        load_task("spekaer")


def test_a_bad_task_file_stops_the_run_before_training(tmp_path: Path, small_corpus: Path, capsys):
    bad = write_jsonl(tmp_path / "quiz.jsonl", [{"context": "a", "choices": ["x", "y"], "label": 5}])
    code = call_cli("train", "--config", str(TINY), "--runs_dir", str(tmp_path / "runs"),
                    f"--data.train={small_corpus}", f"--eval.tasks=[{bad}]", "--train.threads=1")
    assert code == 1
    assert "quiz.jsonl:1: field 'label' is 5, out of range for 2 choices" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "train" / "ckpt").exists()
