"""A lmforge LoRA run's adapter in PEFT's format: peft loads it onto the Hugging Face export of the base
model and gives the logits of lmforge's merged fine-tuned model, for both layouts the export writes."""

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
GPT2 = {"n_heads": 2, "norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True}
# layout -> (model options, LoRA options, the adapter tensors PEFT should find)
CASES = {
    # Attention and MLP of the last layer only, scale alpha/r = 4 (not 1).
    "llama": ({}, ["--finetune.train_layers=1"],
              [f"base_model.model.model.layers.1.{m}.lora_{x}.weight" for m in (
                  "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj") for x in "AB"]),
    # q and v but not k: one rank-3r adapter on the fused c_attn with a zero block for k.
    "gpt2": ({"transformer": GPT2}, ["--finetune.lora.targets=[attn.q,attn.v,mlp.down]"],
             [f"base_model.model.transformer.h.{i}.{m}.lora_{x}.weight" for i in (0, 1)
              for m in ("attn.c_attn", "mlp.c_proj") for x in "AB"]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def lora_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    layout = request.param
    model, lora, _ = CASES[layout]
    root = tmp_path_factory.mktemp(f"peft-{layout}")
    base = make_run(root, context=96, **model)
    lines = (EMBEDDED_DIR / EMBEDDED_TRAIN).read_text(encoding="utf-8").splitlines()
    (root / "chat.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    # A learning rate high enough that B moves far from zero in a few steps.
    assert call_cli("finetune", "--init", str(base), f"--runs_dir={root}", "--name=tuned",
                    f"--finetune.data={root / 'chat.jsonl'}", "--finetune.steps=4", "--finetune.batch_size=4",
                    "--finetune.eval_batches=1", "--finetune.lr=3e-2", "--finetune.lora.rank=2",
                    "--finetune.lora.alpha=8", *lora, *QUIET) == 0
    assert call_cli("export", str(base / "train"), "--format", "hf", "--out", str(root / "base-hf")) == 0
    return layout, root / "tuned" / "finetune", root / "base-hf"


def test_peft_loads_the_adapter_onto_the_export_and_matches_lmforges_merged_logits(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layout, out, base_hf = lora_run
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter.safetensors", "adapter.json", "adapter_config.json",
                                                   "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 8.0)
    assert sorted(load_file(str(adapter / "adapter_model.safetensors"))) == sorted(CASES[layout][2])
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_hf)), str(adapter)).eval()
    merged = load_model(out).model
    idx = torch.randint(0, merged.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = tuned(input_ids=idx).logits, merged(idx)[0]
        plain = AutoModelForCausalLM.from_pretrained(str(base_hf))(input_ids=idx).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters changed the model, so the check below means something
    # fp32 both sides; lmforge merged B@A into W, PEFT adds it beside W: only rounding differs.
    assert (theirs - ours).abs().max() < 1e-5
