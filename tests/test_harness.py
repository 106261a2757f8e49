"""lm-evaluation-harness adapter: lm-eval's scores on local tasks equal lmforge's own scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import RunConfig, TokenizerConfig
from lmforge.data.sources import embedded_corpus
from lmforge.data.tokenizer import train_tokenizer
from lmforge.eval import harness
from lmforge.eval.perplexity import evaluate_text
from lmforge.eval.tasks import evaluate_tasks, load_task, run_task
from lmforge.models import build_model
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import TrainedModel


class Request:
    """What lm-eval hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedModel:
    """A tiny GRU (any registry model works) with a BPE tokenizer trained on two works."""
    texts = [d.text for d in embedded_corpus() if d.id in ("sonnets", "tempest")]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400), texts)
    cfg = RunConfig.model_validate({"model": {"arch": "gru", "context": 48, "d_model": 32, "n_layers": 1,
                                              "vocab_size": tok.vocab_size}})
    torch.manual_seed(1)
    model = build_model(cfg.model).eval()
    return TrainedModel(model=model, tokenizer=tok, cfg=cfg, path=tmp_path_factory.mktemp("model"), step=0)


def test_lm_eval_scores_equal_lmforge_scoring(trained: TrainedModel, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data paths would resolve here: the adapter must write absolute ones
    items = [{"context": "PROSPERO.\nThou poisonous slave, got by the devil himself", "choices": [
        " Upon thy wicked dam, come forth!", " and sing a merry song", " ho!"], "label": 0},
             {"context": "", "choices": ["Full fathom five thy father lies;", "Five full fathom lies thy father;"],
              "label": 0},
             {"context": "MIRANDA.\nO, wonder!\nHow many goodly creatures are there here!\nHow beauteous mankind is! "
                         "O brave new", "choices": [" world", " worlds", " word", " wold"], "label": 0}]
    data = tmp_path / "tasks" / "tempest_mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    own_result, own_details = run_task(load_task(str(data)), trained.model, trained.tokenizer, context=48)

    out = harness.evaluate(trained, [str(data), "minimal_pairs"], tmp_path / "lm_eval_tasks", batch_size=5,
                           log_samples=True)
    written = (tmp_path / "lm_eval_tasks" / "tempest_mc.yaml").read_text()
    assert str((tmp_path / "lm_eval_tasks" / "tempest_mc.jsonl").resolve()) in written
    scores = harness.scores(out)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert scores["tempest_mc"][metric] == pytest.approx(own_result[metric])
    [pairs] = evaluate_tasks(trained.model, trained.tokenizer, 48, ["minimal_pairs"])
    assert {m: scores["minimal_pairs"][m] for m in ("acc", "acc_norm")} == pytest.approx(
        {m: pairs[m] for m in ("acc", "acc_norm")})

    # Item by item, lm-eval saw the same log-likelihoods.
    samples = sorted(out["samples"]["tempest_mc"], key=lambda s: s["doc_id"])
    for sample, mine in zip(samples, own_details, strict=True):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(mine["loglikelihoods"], abs=1e-4)


def test_rolling_and_generation_requests(trained: TrainedModel):
    lm = harness.LmforgeLM(trained=trained, batch_size=4)
    tok = trained.tokenizer
    text = "Our revels now are ended. These our actors, As I foretold you, were all spirits and are melted " * 3
    [rolling] = lm.loglikelihood_rolling([Request(text)])
    assert rolling == pytest.approx(-evaluate_text(trained.model, tok, text, context=48)["nats"], rel=1e-5)

    prompt = "PROSPERO.\nYe elves of hills"
    [out] = lm.generate_until([Request(prompt, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})])
    [expected] = Engine(trained.model, tok).generate(
        [[tok.eot_id, *tok.encode(prompt)]], SamplingParams(max_new_tokens=12, temperature=0.0, stop=["\n\n"]))
    assert out == expected.text

    [(lp, greedy)] = lm.loglikelihood([Request(prompt, expected.text[:8] or " x")])
    assert lp < 0 and isinstance(greedy, bool)


def test_registered_as_a_model_type_next_to_the_builtins():
    from lm_eval.api.registry import get_model

    assert get_model("lmforge") is harness.LmforgeLM
    assert get_model("dummy") is not None  # registering ours did not hide lm-eval's own models
    with pytest.raises(ValueError, match="pretrained"):
        harness.LmforgeLM()
