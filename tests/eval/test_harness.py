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
from lmforge.trained import TrainedModel, load_model


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


# ------------------------------------------- the two lm-eval routes score the same ids
class LocalCompletionsRoute:
    """lm-eval's ``local-completions`` log-likelihood route against ``lmforge serve``: lm-eval's own request
    tokenization (``TemplateLM.loglikelihood`` / ``_encode_pair``, ``TemplateAPI.tok_encode`` with the exported
    tokenizer), its payload and its parser, posted with httpx. Only lm-eval's HTTP client is left out: it needs
    ``tenacity``, which is no test dependency."""

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.api_models import TemplateAPI
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    backend = "causal"
    tokenizer_backend = "huggingface"
    custom_prefix_token_id = None
    loglikelihood = TemplateLM.loglikelihood
    _encode_pair = TemplateLM._encode_pair
    tok_encode = TemplateAPI.tok_encode
    prefix_token_id = TemplateAPI.prefix_token_id

    def __init__(self, url: str, model: str, tokenizer_dir: Path, add_bos_token: bool) -> None:
        from transformers import AutoTokenizer

        self.url, self.model, self.add_bos_token = url, model, add_bos_token
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def _loglikelihood_tokens(self, requests, **kw) -> list[tuple[float, bool]]:
        import httpx

        out = []
        for _, ctx, cont in requests:
            payload = self.LocalCompletionsAPI._create_payload(self, [ctx + cont], generate=False)
            answer = httpx.post(self.url, json=payload, timeout=60)
            assert answer.status_code == 200, answer.text
            out += self.LocalCompletionsAPI.parse_logprobs(answer.json(), [ctx + cont], [len(ctx)])
        return out


MC_ITEMS = [
    {"context": "PROSPERO.\nThou poisonous slave, got by the devil himself",
     "choices": [" Upon thy wicked dam, come forth!", " and sing a merry song", " ho!"], "label": 0},
    {"context": "", "choices": ["Full fathom five thy father lies;", "Five full fathom lies thy father;"], "label": 0},
    {"context": "MIRANDA.\nO, wonder!\nHow many goodly creatures are there here!\nHow beauteous mankind is! O brave new",
     "choices": [" world", " worlds", " word", " wold"], "label": 0},
    {"context": "Shall I compare thee to a summer's", "choices": [" day?", " night?", " sea?"], "label": 0},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Transformer run, its Hugging Face export, and a live server for it."""
    from lmforge.export import export
    from tests.serving import make_run, server_for

    root = tmp_path_factory.mktemp("routes")
    run = make_run(root)
    tm = load_model(run)
    export(tm, "hf", root / "hf")
    server = server_for(run)
    yield tm, root / "hf", server
    server.stop()


@pytest.mark.parametrize("add_bos_token", [False, True], ids=["lm-eval default", "add_bos_token=True"])
def test_adapter_and_local_completions_score_the_same(served, tmp_path, add_bos_token):
    """Issue 16: the adapter put <|endoftext|> first and the server route did not (0.33 nats apart on average).
    Both now score [bos] + context + choice; lm-eval's ``add_bos_token`` must not double it.

    Tolerance 1e-4 nats per choice: both are float32 forwards of the same ids on the same CPU, but the adapter
    scores length-sorted, padded batches while the server prefills each prompt alone, so the sums differ in
    rounding only (about 1e-6 here); a missing or doubled begin token moves them by tenths of a nat."""
    tm, hf_dir, server = served
    data = tmp_path / "routes_mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    task = load_task(str(data))
    pairs = [(it["context"], choice) for it in task.items for choice in it["choices"]]

    adapter = harness.LmforgeLM(trained=tm, batch_size=4).loglikelihood([Request(*p) for p in pairs])
    route = LocalCompletionsRoute(f"{server.base_url}/completions", server.model_name, hf_dir, add_bos_token)
    served_scores = route.loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)

    assert [lp for lp, _ in served_scores] == pytest.approx([lp for lp, _ in adapter], abs=1e-4)
    assert [g for _, g in served_scores] == [g for _, g in adapter]
    own, _ = run_task(task, tm.model, tm.tokenizer, context=tm.cfg.model.context)
    k, served_hits = 0, 0
    for it in task.items:  # the multiple-choice accuracy through the server route equals lmforge's own
        lls = [lp for lp, _ in served_scores[k:k + len(it["choices"])]]
        served_hits += int(max(range(len(lls)), key=lls.__getitem__) == it["label"])
        k += len(it["choices"])
    assert served_hits / len(task.items) == pytest.approx(own["acc"])


def test_exported_tokenizer_gives_the_ids_the_adapter_scores(served):
    """transformers' tokenizer of the export (its defaults) encodes context + choice to exactly the ids the
    adapter scores: the begin token first, then the text."""
    from transformers import AutoTokenizer

    tm, hf_dir, _ = served
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    scorer = harness.LmforgeLM(trained=tm).scorer
    for it in MC_ITEMS:
        for choice in it["choices"]:
            ctx, cont = scorer.encode_pair(it["context"], choice)
            assert hf_tok(it["context"] + choice)["input_ids"] == ctx + cont
            assert ctx[0] == tm.tokenizer.bos_id == tm.tokenizer.token_to_id("<|endoftext|>")
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<|endoftext|>"
