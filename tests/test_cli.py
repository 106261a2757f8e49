"""Bad input gets a one-line error naming the problem and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import parse, verb_help
from lmforge.config import ConfigError
from tests.conftest import TINY, run_cli


def _fails(result, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, err


def test_overrides_and_config_file_merge():
    verb, cfg, args = parse(["train", "--config", str(TINY), "--train.lr=1e-3", "--model.d_model", "64",
                             "--name=x"])
    assert (verb, cfg.train.lr, cfg.model.d_model, cfg.name) == ("train", 1e-3, 64, "x")
    assert cfg.train.steps == 30  # from the YAML
    verb, cfg, args = parse(["generate", "runs/x", "--prompt", "Hi", "--prompt", "Yo"])
    assert args == ["runs/x"] and cfg.sample.prompts == ["Hi", "Yo"]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["train", "--train.lr=-0.1"], "train.lr"),
    (["train", "--train.batch_size=0"], "train.batch_size"),
    (["train", "--model.arch=rwkv"], "model.arch"),
    (["train", "--model.arch=cnn", "--model.cnn.kernel_size=999"], "model.cnn.kernel_size"),
    (["fly"], "unknown verb 'fly'"),
    (["train", "--config", "nope.yaml"], "config file not found: nope.yaml"),
])
def test_config_errors_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert needle in str(e.value)


def test_help_lists_every_train_option():
    text = verb_help("train")
    for key in ("--train.lr=", "--model.arch=", "--data.train=", "--tokenizer.vocab_size="):
        assert key in text


def test_unknown_key_exits_2_without_traceback(tmp_path: Path):
    _fails(run_cli("train", "--train.lrr=1", f"--runs_dir={tmp_path}"), 2, "train.lrr")


def test_missing_corpus(tmp_path: Path):
    _fails(run_cli("run", f"--runs_dir={tmp_path}", f"--data.train=[{tmp_path / 'nowhere'}]"), 1, "nowhere")


def test_empty_corpus(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    _fails(run_cli("run", f"--runs_dir={tmp_path}", f"--data.train=[{empty}]"), 1, "no training text")


def test_corpus_shorter_than_one_sequence(tmp_path: Path):
    short = tmp_path / "short"
    short.mkdir()
    for i in range(3):
        (short / f"{i}.txt").write_text(f"To be or not {i}.")
    # Cleaning off: Gopher's 50-word minimum would drop these documents before the context check is reached.
    _fails(run_cli("run", "--config", str(TINY), f"--runs_dir={tmp_path}", f"--data.train=[{short}]",
                   "--tokenizer.kind=char", "--data.val_docs=[]", "--clean.enabled=false"), 1, "model.context")


def test_checkpoint_of_another_architecture(tmp_path: Path, small_corpus: Path):
    base = ["train", "--config", str(TINY), f"--runs_dir={tmp_path}", f"--data.train=[{small_corpus}]",
            "--train.steps=2", "--train.eval_every=0"]
    assert run_cli(*base).returncode == 0
    _fails(run_cli(*base, "--model.arch=lstm"), 2, "'transformer' model", "model.arch is 'lstm'")


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """``1e-06`` (as Hugging Face config.json files write it) is a number in a recipe and in an override, as
    JSON and YAML 1.2 read it; PyYAML alone would make it the string '1e-06'."""
    from lmforge.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 3e-4\n")
    cfg = load_config(recipe, ['model.hf_config={"model_type": "qwen3", "rms_norm_eps": 1e-06}', "model.arch=hf"])
    assert cfg.train.lr == 3e-4 and cfg.model.hf_config["rms_norm_eps"] == 1e-06
    assert isinstance(cfg.model.hf_config["rms_norm_eps"], float)
