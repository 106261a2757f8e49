"""A lmforge LoRA run's adapter in PEFT's format: peft loads it onto the Hugging Face export of the base
model and gives the logits of lmforge's merged fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.finetune.setup import EMBEDDED_DIR, EMBEDDED_TRAIN
from lmforge.trained import load_model
from tests.in_process import call_cli
from tests.serving import make_run

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--train.threads=1"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = make_run(root, context=96)
    lines = (EMBEDDED_DIR / EMBEDDED_TRAIN).read_text(encoding="utf-8").splitlines()
    (root / "chat.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    # Adapters on attention and MLP of the last layer only, with a scale alpha/r = 4 (not 1), and an lr
    # high enough that B moves far from zero in a few steps.
    assert call_cli("finetune", "--init", str(base), f"--runs_dir={root}", "--name=tuned",
                    f"--finetune.data={root / 'chat.jsonl'}", "--finetune.steps=4", "--finetune.batch_size=4",
                    "--finetune.eval_batches=1", "--finetune.lr=3e-2", "--finetune.lora.rank=2",
                    "--finetune.lora.alpha=8", "--finetune.train_layers=1", *QUIET) == 0
    assert call_cli("export", str(base / "train"), "--format", "hf", "--out", str(root / "base-hf")) == 0
    return root / "tuned" / "finetune", root / "base-hf"


def test_peft_loads_the_adapter_onto_the_export_and_matches_lmforges_merged_logits(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, base_hf = lora_run
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter.safetensors", "adapter.json", "adapter_config.json",
                                                   "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 8.0)
    names = sorted(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert not any(".layers.0." in n for n in names) and len(names) == 2 * 7  # q k v o gate up down of layer 1
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_hf)), str(adapter)).eval()
    merged = load_model(out).model
    idx = torch.randint(0, merged.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = tuned(input_ids=idx).logits, merged(idx)[0]
        plain = AutoModelForCausalLM.from_pretrained(str(base_hf))(input_ids=idx).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters changed the model, so the check below means something
    # fp32 both sides; lmforge merged B@A into W, PEFT adds it beside W: only rounding differs.
    assert (theirs - ours).abs().max() < 1e-5
