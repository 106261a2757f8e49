"""The LSTM, GRU and gated CNN through the whole pipeline: run card, generate, exact resume, bad configs.

Run: ``pytest tests/models/test_archs.py`` (about half a minute on 2 cores: the tiny preset, a dozen steps per run).
The per-model contracts (shapes, decoding equals forward, ...) are in tests/models/test_models.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main as cli_main
from lmforge.config import RunConfig, SampleConfig, load_config
from lmforge.models import REGISTRY
from lmforge.serve.engine import Engine
from lmforge.serve.sample import params_from
from lmforge.train import loop
from lmforge.train.metrics import read_metrics
from lmforge.trained import load_model
from tests.conftest import TINY, run_cli
from tests.hf_families import tiny_hf_config

# One thread: tiny models gain nothing from two, and a busy machine makes two much slower.
FAST = ["--train.threads=1", "--train.steps=12", "--train.eval_every=6", "--train.ckpt_every=6"]
EXTRA = {  # each family also exercises one of its own options
    "lstm": ["--model.rnn.bptt=8", "--model.rnn.embed_dropout=0.1", "--model.dropout=0.1"],
    "gru": ["--model.param_budget=30000"],
    "cnn": ["--model.cnn.dilation_growth=2", "--model.cnn.kernel_size=3"],
}


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # train.threads=1 is process-wide; leave other tests as they were


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> Path:
    return tmp_path_factory.mktemp("arch-runs")


@pytest.fixture(scope="module", params=["lstm", "gru", "cnn"])
def arch_run(request, runs: Path, small_corpus: Path) -> tuple[str, Path]:
    arch = request.param
    cli_main(["run", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]",
              f"--name=tiny-{arch}", f"--model.arch={arch}", *FAST, *EXTRA[arch]])
    return arch, runs / f"tiny-{arch}"


def test_run_produces_a_run_card(arch_run):
    arch, run = arch_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["arch"] == summary["model"]["arch"] == arch
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 8 * 32
    pack = json.loads((run / "pack" / "manifest.json").read_text())["outputs"]
    uniform_bpb = math.log2(320) / (pack["val"]["bytes"] / pack["val"]["tokens"])
    assert math.isfinite(summary["val_bpb"]) and summary["val_bpb"] < uniform_bpb
    assert (run / "report" / "card.html").stat().st_size > 1000
    assert (run / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    samples = json.loads((run / "sample" / "samples.json").read_text())
    assert samples[0]["prompt"] == "ROMEO:" and samples[0]["tokens"] > 0
    # Validation rows carry the training seconds (the bake-off's time axis), rising with the step.
    val = [r for r in read_metrics(run / "train" / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [6, 12] and 0 < val[0]["seconds"] < val[1]["seconds"]
    tm = load_model(run)
    assert tm.cfg.model.arch == arch and type(tm.model) is REGISTRY[arch]
    assert summary["params"] == tm.model.num_params()
    if arch == "gru":  # sized by budget: the chosen width is recorded and saved explicitly
        assert tm.cfg.model.param_budget is None and summary["model"]["d_model"] == tm.cfg.model.d_model
        assert abs(summary["params"] - 30_000) <= 0.25 * 30_000
    if arch == "lstm":
        assert tm.cfg.model.rnn.bptt == 8


def test_generate_works(arch_run):
    arch, run = arch_run
    result = run_cli("generate", str(run), "--prompt", "KING:", "--sample.max_new_tokens=12",
                     "--sample.temperature=0")
    assert result.returncode == 0, result.stderr
    # Greedy, so the text is known: the engine's completion in this process, streamed after the prompt.
    tm = load_model(run)
    params = params_from(SampleConfig(max_new_tokens=12, temperature=0))
    completion = Engine(tm.model, tm.tokenizer).generate(["KING:"], params)[0]
    assert completion.completion_tokens == 12 or completion.finish_reason == "stop"
    assert result.stdout == "KING:" + completion.text + "\n\n"


@pytest.fixture(scope="module")
def packed(runs: Path, small_corpus: Path) -> Path:
    """A run folder with documents, tokenizer and token shards only: what the training loop reads."""
    cli_main(["pack", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]", "--name=packed"])
    return runs / "packed"


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_exact_resume(arch, runs: Path, packed: Path):
    """Stopped at step 4 and resumed == 8 steps straight: same losses, bitwise the same weights.

    Bitwise: lmforge promises exact resume on the same machine and thread count (docs/reliability.md).
    """
    over = [f"model.arch={arch}", "train.steps=8", "train.log_every=1", "train.ckpt_every=0", "train.threads=1",
            "model.dropout=0.1", "train.eval_every=0"]
    if arch == "hf":  # a tiny Qwen3 through the wrapper; its vocabulary is laid over from the tokenizer
        over.append("model.hf_config=" + json.dumps(tiny_hf_config(320, 32, 2, 32, dropout=0.1)))

    def train(name: str, *extra: str) -> Path:
        run_dir = runs / f"resume-{arch}" / name
        for part in ("tokenizer", "pack"):
            if not (run_dir / part).exists():
                shutil.copytree(packed / part, run_dir / part)
        loop.main(load_config(TINY, [*over, "train.progress=false", *extra]), run_dir)
        return run_dir

    straight = train("straight")
    resumed = train("resumed", "train.stop_at=4")
    assert sorted({r["step"] for r in read_metrics(resumed / "train")}) == [1, 2, 3, 4]
    resumed = train("resumed")

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run_dir / "train") if r["kind"] == "train"}

    assert losses(straight) == losses(resumed) and sorted(losses(resumed)) == list(range(1, 9))
    a = load_file(straight / "train" / "ckpt" / "step_000008" / "model.safetensors")
    b = load_file(resumed / "train" / "ckpt" / "step_000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The fingerprint hashes the resolved config (vocabulary filled in), as every checkpoint written so far
    # has it: otherwise the checkpoints already on disk would be refused at resume.
    state = json.loads((resumed / "train" / "ckpt" / "step_000008" / "state.json").read_text())
    resolved = RunConfig.model_validate(state["config"])
    assert resolved.model.vocab_size > 0 and state["fingerprint"] == loop.train_fingerprint(resolved)


def _fails_with(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.mark.parametrize("argv, needles", [
    (["--model.arch=cnn", "--model.cnn.kernel_size=64"], ["model.cnn.kernel_size (64)", "model.context (32)"]),
    (["--model.arch=mamba"], ["model.arch", "'mamba'"]),
    (["--model.arch=lstm", "--model.rnn.bptt=33"], ["model.rnn.bptt (33)", "model.context (32)"]),
])
def test_bad_model_configs_exit_2_naming_the_field(argv, needles, tmp_path: Path):
    _fails_with(run_cli("train", "--config", str(TINY), f"--runs_dir={tmp_path}", *argv), *needles)


def test_unreachable_param_budget_exits_2_naming_the_field(runs: Path, small_corpus: Path, packed: Path):
    # Known only once the tokenizer fixes the vocabulary: fails in the train stage (the stages before it
    # are done already in `packed`), still exit 2.
    result = run_cli("train", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]",
                     "--name=packed", "--model.arch=lstm", "--model.param_budget=500")
    _fails_with(result, "model.param_budget (500) is out of reach")
