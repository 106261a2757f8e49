"""Benchmark: tokenize + pack speed per core, the pack stage's path against the one it replaced.

"before" is the earlier pack loop: ``tokenizers``' ``encode_batch`` (with offsets) on batches of 256
documents, then one ``np.asarray(ids).tobytes()`` write per document. "now" is
:func:`lmforge.data.pack.write_shards`: tiktoken where its ids are exact (else ``encode_batch_fast``),
whole batches flattened with numpy. Both read the same docs-stage JSONL and write shards of the same
format; the benchmark checks that their files are byte-identical, then reports input MB per CPU-second
of this process (user + system, all threads; per core is what the tasks multiply) and per wall second,
over ``--rounds`` rounds that alternate the two sides, and where the time of "now" goes.

Corpora: the embedded Shakespeare (the demo's 5 MB) and a generated one of ``--mb`` megabytes
(documents of 2-200 kB recombined from the embedded lines, with numbers, accents and emoji mixed in),
cached in ``--dir``. The tokenizer is the demo's: byte-level BPE, vocabulary 2,048, trained on the
embedded corpus (``--vocab`` for another size). ::

    python benchmarks/pack_speed.py --mb 5                  # a quick check (about a minute on 2 cores)
    python benchmarks/pack_speed.py --mb 100 --rounds 2     # the figures in docs/benchmarks.md (about 15 minutes)

Expected output ends with lines like::

    generated 100 MB, 100.1 MB of text: before 0.90 MB/CPU-s (0.38 MB/s wall), now 10.56 MB/CPU-s (4.33 MB/s wall),
    11.7x per core; shards identical
      now, where the CPU time goes: read JSONL 0.22 s (2%), encode 8.46 s (91%), flatten + write 0.60 s (7%)
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmforge.config import TokenizerConfig  # noqa: E402
from lmforge.data import pack  # noqa: E402
from lmforge.data.encode import batch_encoder, flatten  # noqa: E402
from lmforge.data.readers.files import docs_texts, stage_texts  # noqa: E402
from lmforge.data.sources import Document, embedded_corpus  # noqa: E402
from lmforge.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

EXTRAS = ["3.14159", "1,024", "2026-12-06", "naïve café", "Straße", "😀", "👍🏽", "—", "«quoted»", "\t", "  "]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_docs(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(Document(id=f"d{i}", text=text, source="bench", meta={}).to_json() + "\n")


def generated(mb: int, seed: int) -> list[str]:
    """About ``mb`` MB of documents recombined from the embedded corpus's lines, seeded."""
    rng = random.Random(seed)
    lines = [line for d in embedded_corpus() for line in d.text.splitlines() if line.strip()]
    texts, total = [], 0
    while total < mb * 1_000_000:
        target = rng.randint(2_000, 200_000)
        parts, size = [], 0
        while size < target:
            line = rng.choice(lines)
            if rng.random() < 0.05:
                line = f"{line} {rng.choice(EXTRAS)} {rng.randint(0, 10 ** rng.randint(1, 9))}"
            parts.append(line)
            size += len(line) + 1
        texts.append("\n".join(parts))
        total += len(texts[-1].encode("utf-8"))
    return texts


def pack_before(docs: Path, tok: Tokenizer, out: Path) -> dict:
    """The earlier pack loop, kept here as the baseline: encode_batch, then a write per document."""
    writer = pack.ShardWriter(out, "train", tok.vocab_size, 100_000_000)
    pack._remove_shards(out, "train")
    n_bytes = 0
    for batch in pack._batches(stage_texts(docs), pack.ENCODE_BATCH):
        for text, enc in zip(batch, tok.inner.encode_batch(batch, add_special_tokens=False), strict=True):
            ids = enc.ids
            ids.append(tok.eot_id)
            if writer._file is None:
                writer._open()
            writer._file.write(np.asarray(ids, dtype=writer.dtype).tobytes())
            writer._tokens += len(ids)
            writer._offsets.append(writer._tokens)
            n_bytes += len(text.encode("utf-8"))
    writer.close()
    return {"bytes": n_bytes}


def pack_now(docs: Path, tok: Tokenizer, out: Path) -> dict:
    return pack.write_shards(docs_texts(docs), tok, out, "train")


def where_time_goes(docs: Path, tok: Tokenizer) -> dict[str, float]:
    """CPU-seconds of reading the JSONL, encoding and flattening + writing, measured apart."""
    encode, _ = batch_encoder(tok)
    t = cpu_seconds()
    batches = list(pack._batches(docs_texts(docs), pack.ENCODE_BATCH))
    read = cpu_seconds() - t
    t = cpu_seconds()
    encoded = [encode(b) for b in batches]
    enc = cpu_seconds() - t
    t = cpu_seconds()
    with open(os.devnull, "wb") as f:
        for ids in encoded:
            f.write(flatten(ids, tok.eot_id, np.dtype(np.uint16))[0].tobytes())
    return {"read JSONL": read, "encode": enc, "flatten + write": cpu_seconds() - t}


def compare(name: str, docs: Path, tok: Tokenizer, work: Path, rounds: int) -> None:
    mb = docs.stat().st_size / 1e6
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
    sides = {"before": pack_before, "now": pack_now}
    for r in range(rounds):
        for side in ("before", "now") if r % 2 == 0 else ("now", "before"):
            out = work / side
            out.mkdir(parents=True, exist_ok=True)
            c, w = cpu_seconds(), time.perf_counter()
            stats = sides[side](docs, tok, out)
            runs[side].append((cpu_seconds() - c, time.perf_counter() - w))
            mb = stats["bytes"] / 1e6
    same = (
        all(
            a.read_bytes() == b.read_bytes()
            for a, b in zip(
                pack.list_shards(work / "before", "train"), pack.list_shards(work / "now", "train"), strict=True
            )
        )
        and (work / "before" / "train_000.idx.npy").read_bytes() == (work / "now" / "train_000.idx.npy").read_bytes()
    )
    best = {side: (min(c for c, _ in v), min(w for _, w in v)) for side, v in runs.items()}
    for side, v in runs.items():
        rounds_text = ", ".join(f"{c:.2f}/{w:.2f}" for c, w in v)
        print(f"  {side:6s} CPU-s/wall-s per round: {rounds_text}")
    print(
        f"{name} {mb:.1f} MB of text: before {mb / best['before'][0]:.2f} MB/CPU-s ({mb / best['before'][1]:.2f} MB/s "
        f"wall), now {mb / best['now'][0]:.2f} MB/CPU-s ({mb / best['now'][1]:.2f} MB/s wall), "
        f"{best['before'][0] / best['now'][0]:.1f}x per core; shards {'identical' if same else 'DIFFERENT'}"
    )
    parts = where_time_goes(docs, tok)
    total = sum(parts.values())
    print("  now, where the CPU time goes: " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in parts.items()))
    shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=5, help="size of the generated corpus in MB")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (the demo's: 2048)")
    ap.add_argument("--dir", default="/tmp/lmforge_pack_bench", help="cache of the corpora and tokenizer")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    demo = [d.text for d in embedded_corpus()]
    tok_dir = root / f"bpe{args.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=args.vocab), demo).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    print(f"encoder now: {batch_encoder(tok)[1]}; load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    if not (root / "demo.jsonl").is_file():
        write_docs(root / "demo.jsonl", demo)
    compare("embedded corpus", root / "demo.jsonl", tok, root / "work", args.rounds)
    big = root / f"generated_{args.mb}mb_{args.seed}.jsonl"
    if not big.is_file():
        write_docs(big, generated(args.mb, args.seed))
    compare(f"generated {args.mb} MB,", big, tok, root / "work", args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
