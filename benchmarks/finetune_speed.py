"""Fine-tuning speed: lmforge against TRL's SFTTrainer and DPOTrainer on the same tiny Llama, data, batch and CPU.

One process, side by side, each side on the same number of threads:

1. A tiny Llama-family model is written as a Hugging Face folder (``LlamaForCausalLM``, random weights;
   width 128, 4 layers, 4 heads, context 128, tied embeddings, a 2,048-token BPE trained by lmforge on
   the embedded corpus, with ChatML's special tokens and lmforge's chat template). lmforge loads the
   folder into its native Transformer exactly (:mod:`lmforge.trained.hf`); TRL loads it with
   ``AutoModelForCausalLM``.
2. Chat fine-tuning on the first ``--conversations`` conversations of the embedded chat set, batch
   ``--batch``, ``--steps`` AdamW steps at lr 3e-4: lmforge (``lmforge finetune``) unpacked
   (``finetune.pack=false``) and packed (``finetune.pack=true``), and TRL's ``SFTTrainer`` (padding to
   the longest of each batch, its default). Then the two layouts alone: forward and backward of the
   same batches, padded and packed, alternating batch by batch. Useful tokens are the conversations' real tokens (no
   padding; TRL counts its own, having shuffled with its own sampler); tokens/s is useful tokens over
   the training time (lmforge: the loop's own step time; TRL: ``train_runtime``).
3. DPO on the embedded preference set, batch ``--dpo-batch`` pairs, ``--dpo-steps`` steps at beta 0.1:
   lmforge (``finetune.mode=dpo``, a frozen copy as reference) and TRL's ``DPOTrainer`` (its reference
   a copy too): steps/s.

The sides run in ``--rounds`` rounds, the order turning each round, and the fastest round of each
side is kept: on a machine shared with other jobs the load drifts over minutes, and the fastest round
is the one least disturbed. Loss masks differ in one respect: TRL's conversational SFT trains on every token unless the template
marks assistant turns (lmforge's has no ``{% generation %}`` marks), while lmforge trains on assistant
tokens only; the compute per token is the same. Run::

    .venv/bin/python benchmarks/finetune_speed.py                       # a few minutes on 2 cores
    .venv/bin/python benchmarks/finetune_speed.py --steps 2 --dpo-steps 2 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from lmforge.config import TokenizerConfig
from lmforge.data.chat import CHAT_TEMPLATE, IM_END
from lmforge.data.sources import embedded_corpus
from lmforge.data.tokenizer import EOT, PAD, train_tokenizer
from lmforge.finetune.setup import EMBEDDED_DIR, EMBEDDED_TRAIN, PAIRS_TRAIN

CONTEXT = 128


def build_folder(folder: Path, family: str = "llama") -> None:
    """The tiny Llama (or Qwen2) as a Hugging Face folder, tokenizer and chat template included."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    texts = [d.text[:400_000] for d in embedded_corpus()][:12]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=2048), texts)
    tok_dir = tok.save(folder / "lmforge-tokenizer")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir), bos_token=EOT,
                                     eos_token=IM_END, pad_token=PAD)
    hf_tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    cfg = config(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=True, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)


def write_data(folder: Path, n_conv: int, n_pairs: int) -> tuple[Path, Path]:
    chat = (EMBEDDED_DIR / EMBEDDED_TRAIN).read_text(encoding="utf-8").splitlines()[:n_conv]
    pairs = [json.loads(s) for s in (EMBEDDED_DIR / PAIRS_TRAIN).read_text(encoding="utf-8").splitlines()]
    pairs = [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) < 220][:n_pairs]
    (folder / "chat.jsonl").write_text("\n".join(chat) + "\n", encoding="utf-8")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return folder / "chat.jsonl", folder / "pairs.jsonl"


def lmforge_run(model: Path, runs: Path, name: str, data: Path, steps: int, batch: int, threads: int,
                *extra: str) -> dict:
    from lmforge.cli import main

    main(["finetune", "--init", str(model), f"--runs_dir={runs}", f"--name={name}", f"--finetune.data={data}",
          f"--finetune.steps={steps}", f"--finetune.batch_size={batch}", "--finetune.lr=3e-4",
          "--finetune.warmup_steps=0", "--finetune.eval_every=0", "--finetune.eval_batches=1",
          "--finetune.ckpt_every=0", f"--finetune.max_length={CONTEXT}", "--train.progress=false",
          "--train.tensorboard=false", f"--train.threads={threads}", "--finetune.on_bad_line=skip", *extra])
    return json.loads((runs / name / "finetune" / "results.json").read_text())


def useful_tokens(run: Path, steps: int, batch: int, pack: bool) -> int:
    """The real (non-padding) tokens of the batches the run trained on, replayed from its loader."""
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.finetune.data import ChatLoader

    pad = Tokenizer.load(run / "finetune" / "tokenizer").pad_id
    loader = ChatLoader(run / "finetune" / "data", "train", batch, CONTEXT, seed=1337, pad_id=pad, pack=pack)
    return sum(int((loader.next_batch()[0] != pad).sum()) for _ in range(steps))


def trl_sft(model: Path, data: Path, steps: int, batch: int, out: Path) -> tuple[float, int]:
    """(seconds, tokens) of TRL's SFTTrainer on the same conversations."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-4,
                     warmup_steps=0, lr_scheduler_type="cosine", max_length=CONTEXT, packing=False,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     seed=1337, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, processing_class=tok,
                         train_dataset=load_dataset("json", data_files=str(data), split="train"))
    metrics = trainer.train().metrics
    tokens = next((h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h), 0)
    return metrics["train_runtime"], int(tokens)


def trl_dpo(model: Path, data: Path, steps: int, batch: int, out: Path) -> float:
    """Seconds of TRL's DPOTrainer on the same pairs (prompt as a user turn, answers as assistant turns)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(s) for s in data.read_text(encoding="utf-8").splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                     warmup_steps=0, beta=0.1, max_length=CONTEXT, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, seed=1337)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, processing_class=AutoTokenizer
                         .from_pretrained(model), train_dataset=ds)
    return trainer.train().metrics["train_runtime"]


def packing_steps(root: Path, args: argparse.Namespace) -> dict:
    """Seconds of forward + backward over the same ``--steps`` batches, padded and packed, alternating batch
    by batch (so both layouts see the same load), the fastest of ``--rounds`` passes, as wall and as CPU
    seconds of this process (all its threads: less disturbed by other jobs than the wall clock); their
    real tokens and the positions each layout computes, and what ``finetune.pack=auto`` decides."""
    import time

    from lmforge.data.tokenizer import Tokenizer
    from lmforge.finetune.data import ChatLoader
    from lmforge.trained import load_model

    model = load_model(root / "llama").model.train()
    data = root / "runs" / "unpacked-0" / "finetune"
    pad = Tokenizer.load(data / "tokenizer").pad_id
    loaders = [ChatLoader(data / "data", "train", args.batch, CONTEXT, seed=1337, pad_id=pad, pack=p) for p in (0, 1)]
    auto = ChatLoader(data / "data", "train", args.batch, CONTEXT, seed=1337, pad_id=pad, pack="auto").pack
    batches = [[ld.next_batch() for _ in range(args.steps)] for ld in loaders]
    best = {"wall": [float("inf")] * 2, "cpu": [float("inf")] * 2}
    for _ in range(args.rounds):
        spent = {"wall": [0.0, 0.0], "cpu": [0.0, 0.0]}
        for k in range(args.steps):
            for layout in (0, 1):
                t0, c0 = time.perf_counter(), time.process_time()
                model(*batches[layout][k])[1].backward()
                spent["wall"][layout] += time.perf_counter() - t0
                spent["cpu"][layout] += time.process_time() - c0
                model.zero_grad(set_to_none=True)
        best = {k: [min(b, s) for b, s in zip(best[k], spent[k], strict=True)] for k in best}
    return {**best, "real": sum(int((b[0] != pad).sum()) for b in batches[0]), "auto": auto,
            "arch": load_model(root / "llama").cfg.model.arch,
            "positions": [sum(b[0].numel() for b in batches[layout]) for layout in (0, 1)]}


def report_packing(m: dict, args: argparse.Namespace) -> None:
    real, (padded, packed) = m["real"], m["positions"]
    print(f"\npacking ({args.family}, model.arch={m['arch']}), forward + backward over the same {args.steps} batches "
          f"x {args.batch}, alternating, fastest of {args.rounds}: {real:,d} real tokens; positions computed padded "
          f"{padded:,d}, packed {packed:,d}; finetune.pack=auto packs: {m['auto']}")
    for clock in ("wall", "cpu"):
        a, b = m[clock]
        print(f"  {clock:4s}: padded {real / a:,.0f}, packed {real / b:,.0f} useful tokens per {clock} second: "
              f"{a / b:.2f}x")


def chat_round(root: Path, chat: Path, args: argparse.Namespace, r: int) -> dict[str, float]:
    """Seconds of each side in round ``r`` (the order turns each round: load on a shared machine drifts)."""
    sides = ["unpacked", "packed", "trl"]
    sides = sides[r % 3:] + sides[: r % 3]
    out = {}
    for side in sides:
        torch.set_num_threads(args.threads)
        if side == "trl":  # TRL shuffles with its own sampler: its real tokens are counted by TRL itself
            out[side], out["trl_tokens"] = trl_sft(root / "llama", chat, args.steps, args.batch, root / f"trl-sft-{r}")
        else:
            res = lmforge_run(root / "llama", root / "runs", f"{side}-{r}", chat, args.steps, args.batch, args.threads,
                              f"--finetune.pack={str(side == 'packed').lower()}")
            out[side] = res["train"]["train_seconds"]
    return out


def dpo_round(root: Path, pairs: Path, args: argparse.Namespace, r: int) -> dict[str, float]:
    out = {}
    for side in (["lmforge", "trl"] if r % 2 == 0 else ["trl", "lmforge"]):
        torch.set_num_threads(args.threads)
        if side == "trl":
            out[side] = trl_dpo(root / "llama", pairs, args.dpo_steps, args.dpo_batch, root / f"trl-dpo-{r}")
        else:
            out[side] = lmforge_run(root / "llama", root / "runs", f"dpo-{r}", pairs, args.dpo_steps, args.dpo_batch,
                                    args.threads, "--finetune.mode=dpo", "--finetune.lr=1e-4")["train"]["train_seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="chat fine-tuning steps per side and round")
    p.add_argument("--batch", type=int, default=16, help="conversations per step")
    p.add_argument("--conversations", type=int, default=400, help="conversations of the embedded chat set used")
    p.add_argument("--dpo-steps", type=int, default=6, help="DPO steps per side and round")
    p.add_argument("--dpo-batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every side; the fastest of each side is kept")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--family", choices=["llama", "qwen2"], default="llama",
                   help="the tiny model's family: llama (lmforge loads it natively) or qwen2 (biases: wrapped, model.arch=hf)")
    p.add_argument("--only-packing", action="store_true", help="only the packing comparison (no TRL, no DPO)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_folder(root / "llama", args.family)
        chat, pairs = write_data(root, args.conversations, 4 * args.dpo_batch * args.dpo_steps)
        if args.only_packing:  # the data prepared once by a one-step run, then the two layouts alone
            lmforge_run(root / "llama", root / "runs", "unpacked-0", chat, 1, args.batch, args.threads,
                        "--finetune.pack=false")
            report_packing(packing_steps(root, args), args)
            return 0
        rounds = [chat_round(root, chat, args, r) for r in range(args.rounds)]
        best = {side: min(r[side] for r in rounds) for side in ("unpacked", "packed", "trl")}
        tokens = {side: useful_tokens(root / "runs" / f"{side}-0", args.steps, args.batch, side == "packed")
                  for side in ("unpacked", "packed")}
        tokens["trl"] = int(rounds[0]["trl_tokens"])
        base = tokens["trl"] / best["trl"]
        print(f"\nchat fine-tuning, {args.steps} steps x {args.batch} conversations, {args.threads} threads, "
              f"fastest of {args.rounds} rounds")
        print("seconds per round: " + "; ".join(", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "trl_tokens")
                                                for r in rounds))
        print(f"{'':22s} {'seconds':>8s} {'useful tokens':>14s} {'tokens/s':>9s} {'vs TRL':>7s}")
        for side, name in (("unpacked", "lmforge, unpacked"), ("packed", "lmforge, packed"), ("trl", "TRL SFTTrainer")):
            t, s = tokens[side], best[side]
            print(f"{name:22s} {s:8.2f} {t:14,d} {t / s:9,.0f} {t / s / base:6.2f}x")
        report_packing(packing_steps(root, args), args)
        dpo = [dpo_round(root, pairs, args, r) for r in range(args.rounds)]
        ours, trl = min(r["lmforge"] for r in dpo), min(r["trl"] for r in dpo)
        per_round = "; ".join(f"lmforge {r['lmforge']:.1f} s, TRL {r['trl']:.1f} s" for r in dpo)
        print(f"\nDPO, {args.dpo_steps} steps x {args.dpo_batch} pairs, fastest of {args.rounds} rounds ({per_round}): "
              f"lmforge {args.dpo_steps / ours:.2f} steps/s, TRL DPOTrainer {args.dpo_steps / trl:.2f} steps/s: "
              f"{trl / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
