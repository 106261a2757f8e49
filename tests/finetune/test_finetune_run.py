"""Fine-tuning end to end: the finetune verb on chat and text, LoRA resume, `lmforge chat`, the pipeline stage."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.data.chat import render_chat
from lmforge.finetune.setup import EMBEDDED_DIR, EMBEDDED_TASK, EMBEDDED_TRAIN
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import load_model
from tests.conftest import TINY
from tests.in_process import call_cli
from tests.serving import make_run

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--train.threads=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("base"), context=96)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    """60 conversations and 10 held-out items of the embedded set."""
    folder = tmp_path_factory.mktemp("chat")
    lines = (EMBEDDED_DIR / EMBEDDED_TRAIN).read_text(encoding="utf-8").splitlines()
    (folder / "chat.jsonl").write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
    task = (EMBEDDED_DIR / EMBEDDED_TASK).read_text(encoding="utf-8").splitlines()
    (folder / "task.jsonl").write_text("\n".join(task[:10]) + "\n", encoding="utf-8")
    return {"data": folder / "chat.jsonl", "task": folder / "task.jsonl"}


def _finetune_args(base: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["finetune", "--init", str(base), f"--runs_dir={runs}", f"--name={name}", "--finetune.batch_size=4",
            "--finetune.eval_batches=2", "--finetune.steps=4", "--finetune.lr=1e-3", *QUIET, *extra]


def test_chat_finetune_via_cli(base, chat_files, tmp_path):
    code = call_cli(*_finetune_args(base, tmp_path, "chat", f"--finetune.data={chat_files['data']}",
                                    f"--finetune.heldout_task={chat_files['task']}"))
    assert code == 0
    out = tmp_path / "chat" / "finetune"
    result = json.loads((out / "results.json").read_text())
    assert result["train"]["steps"] == 4 and result["train"]["complete"]
    data = result["data"]
    assert data["read"]["kept"] == 60 and data["train"]["kept"] + data["val"]["kept"] + sum(
        data["train"]["dropped"].values()) + sum(data["val"]["dropped"].values()) == 60
    task = result["compare"]["task"]
    assert task["base"]["items"] == task["finetuned"]["items"] == 10 and task["base"]["chance"] == 0.25
    for name in ("config.yaml", "tokenizer/tokenizer.json", "data/chat_train.npz", "metrics.jsonl"):
        assert (out / name).is_file(), name
    tuned, before = load_model(out), load_model(base)
    assert tuned.step == 4
    idx = torch.tensor([tuned.tokenizer.encode("To be, or not to be")])
    assert not torch.equal(tuned.model(idx)[0], before.model(idx)[0])
    # A rerun finds the finished checkpoint and trains no further.
    assert call_cli(*_finetune_args(base, tmp_path, "chat", f"--finetune.data={chat_files['data']}",
                                    f"--finetune.heldout_task={chat_files['task']}")) == 0
    assert load_model(out).step == 4


def test_text_finetune_with_frozen_layers(base, small_corpus, tmp_path):
    code = call_cli(*_finetune_args(base, tmp_path, "text", "--finetune.mode=text",
                                    f"--finetune.data={small_corpus / 'tempest.txt'}", "--finetune.train_layers=1",
                                    "--finetune.freeze_embeddings=true", "--finetune.max_length=64"))
    assert code == 0
    result = json.loads((tmp_path / "text" / "finetune" / "results.json").read_text())
    domain = result["compare"]["finetune_val"]
    assert domain["base"]["bpb"] > 0 and domain["finetuned"]["bpb"] > 0
    before = load_model(base).model.state_dict()
    after = load_model(tmp_path / "text" / "finetune").model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("layers.1.") or k == "norm.weight" for k in changed)


def test_lora_run_resumes_exactly(base, chat_files, tmp_path):
    def run(name: str, *extra: str) -> int:
        return call_cli(*_finetune_args(base, tmp_path, name, f"--finetune.data={chat_files['data']}",
                                        "--finetune.lora.rank=4", "--finetune.lora.dropout=0.1",
                                        "--finetune.steps=6", "--finetune.ckpt_every=0", *extra))

    assert run("whole") == 0
    assert run("split", "--finetune.stop_at=3") == 0
    assert sorted(p.name for p in (tmp_path / "split/finetune/ckpt").iterdir()) == ["step_000003"]
    assert run("split") == 0
    weights = [load_file(str(tmp_path / n / "finetune/ckpt/step_000006/model.safetensors")) for n in ("whole", "split")]
    assert weights[0].keys() == weights[1].keys() and any(".lora_A" in k for k in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    vals = [json.loads((tmp_path / n / "finetune/results.json").read_text())["train"]["last_val"]
            for n in ("whole", "split")]
    assert vals[0] == vals[1]
    # The adapter alone, loaded onto the base, gives the merged fine-tuned model's logits.
    adapter = tmp_path / "whole/finetune/adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter.safetensors", "adapter.json", "adapter_config.json",
                                                   "adapter_model.safetensors"}  # lmforge's and PEFT's formats
    from lmforge.train.lora import load_adapter

    plain = load_model(base).model
    load_adapter(plain, adapter)
    merged = load_model(tmp_path / "whole/finetune").model
    idx = torch.tensor([[5, 9, 40, 7, 100, 3]])
    torch.testing.assert_close(plain.eval()(idx)[0], merged(idx)[0], atol=1e-5, rtol=0)
    # And the merged model exports like any other.
    assert call_cli("export", str(tmp_path / "whole/finetune"), "--format", "lmforge",
                    "--out", str(tmp_path / "exported")) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_bad_chat_data_and_foreign_tokenizer_give_clear_errors(base, chat_files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = chat_files["data"].read_text().splitlines()[0]
    bad.write_text(f'{good}\n{{"messages": [{{"role": "robot", "content": "hi"}}]}}\n', encoding="utf-8")
    assert call_cli(*_finetune_args(base, tmp_path, "bad", f"--finetune.data={bad}")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: messages[0].role is 'robot'") and "Traceback" not in err
    other = tmp_path / "other"
    shutil.copytree(base, other)
    text = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    text["added_tokens"][-1]["content"] = "<|something_else|>"
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(text))
    assert call_cli(*_finetune_args(other, tmp_path, "foreign", f"--finetune.data={chat_files['data']}")) == 1
    assert "is not the tokenizer" in capsys.readouterr().err


def test_terminal_chat_with_piped_input(base, tmp_path):
    from lmforge.serve.repl import main as chat

    cfg = load_config(None, ["sample.temperature=0", "sample.max_new_tokens=8"])
    out = io.StringIO()
    messages = chat(cfg, str(base), stdin=io.StringIO("Hello\nWho are you?\n/reset\nHi\n/exit\nignored\n"), stdout=out)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hi"
    tm = load_model(base)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)  # stops at the end tokens, as the chat does
    prompt = render_chat(tm.tokenizer, [{"role": "user", "content": "Hi"}])
    expected = Engine(tm.model, tm.tokenizer).generate([prompt], params)[0].text
    assert expected and out.getvalue().endswith(f"(new conversation)\nmodel> {expected}\n")
    assert out.getvalue().count("model> ") == 3


def test_pipeline_finetune_stage_reports_and_is_skipped_when_done(small_corpus, tmp_path):
    args = ["run", "--config", str(TINY), f"--data.train={small_corpus}", f"--runs_dir={tmp_path}",
            "--model.context=96", "--train.steps=10", "--finetune.enabled=true", "--finetune.steps=3",
            "--finetune.batch_size=4", "--finetune.eval_batches=2", *QUIET]
    assert call_cli(*args) == 0
    run = tmp_path / "tiny"
    manifest = json.loads((run / "finetune" / "manifest.json").read_text())
    compare = manifest["outputs"]["compare"]
    assert compare["task"]["base"]["items"] == 200 and 0 <= compare["task"]["finetuned"]["acc"] <= 1
    eval_val = json.loads((run / "eval" / "manifest.json").read_text())["outputs"]["val"]
    assert compare["pretrain_val"]["base"]["bpb"] == eval_val["bpb"]  # the base is the eval stage's model
    card = (run / "report" / "card.md").read_text()
    assert "## Fine-tuning" in card and "held-out task shakespeare_qa_heldout: accuracy" in card
    assert call_cli(*args) == 0
    assert json.loads((run / "finetune" / "manifest.json").read_text())["finished_at"] == manifest["finished_at"]


def test_finetune_from_a_hugging_face_folder(chat_files, tmp_path, capsys):
    from tests.trained.test_hf_import import TEXT, build

    folder = tmp_path / "gpt2"
    build("gpt2", folder)
    (tmp_path / "domain.txt").write_text(TEXT * 3, encoding="utf-8")
    args = ["finetune", "--init", str(folder), f"--runs_dir={tmp_path}", "--finetune.batch_size=2",
            "--finetune.steps=3", "--finetune.eval_batches=1", "--finetune.max_length=32", *QUIET]
    assert call_cli(*args, "--name=hf", "--finetune.mode=text", f"--finetune.data={tmp_path / 'domain.txt'}",
                    "--finetune.lora.rank=2", "--finetune.lora.targets=[layers.*.attn.q]") == 0
    result = json.loads((tmp_path / "hf" / "finetune" / "results.json").read_text())
    assert result["train"]["steps"] == 3 and result["compare"]["finetune_val"]["finetuned"]["bpb"] > 0
    assert load_model(tmp_path / "hf" / "finetune").cfg.model.arch == "transformer"
    # Its tokenizer has no chat tokens: chat fine-tuning is refused in one line.
    assert call_cli(*args, "--name=hf-chat", f"--finetune.data={chat_files['data']}") == 2
    assert "has no <|im_start|> / <|im_end|> tokens" in capsys.readouterr().err


def test_finetune_with_every_checkpoint_damaged_stops_and_keeps_it(base, chat_files, tmp_path):
    """Fine-tuning resumes through the training loop's own path: the same refusal to restart silently."""
    def run(*extra: str) -> int:
        return call_cli(*_finetune_args(base, tmp_path, "damaged", f"--finetune.data={chat_files['data']}", *extra))

    assert run("--finetune.stop_at=2") == 0
    weights = tmp_path / "damaged/finetune/ckpt/step_000002/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    damaged = weights.read_bytes()
    assert run() == 1
    assert weights.read_bytes() == damaged
    assert run("--train.resume=false") == 0  # the way to start over on purpose
    assert load_model(tmp_path / "damaged/finetune").step == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_without_cuda_is_refused_in_one_line_before_anything_is_written(base, chat_files, tmp_path, capsys):
    args = _finetune_args(base, tmp_path, "q", f"--finetune.data={chat_files['data']}", "--finetune.lora.rank=2",
                          "--finetune.lora.quantize=4bit")
    assert call_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "finetune.lora.quantize=4bit needs a CUDA GPU" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()
    # Quantizing a base that no adapter trains on is a config error naming both settings.
    assert call_cli(*_finetune_args(base, tmp_path, "q", "--finetune.lora.quantize=4bit")) == 2
    assert "finetune.lora.rank >= 1" in capsys.readouterr().err
