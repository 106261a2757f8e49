"""Tests for lmforge.data.readers.files and lmforge.data.sources (reading) and lmforge.data.split (the docs stage)."""

from __future__ import annotations

import gzip
import json
import lzma
import re
from pathlib import Path

import pytest

from lmforge.config import RunConfig
from lmforge.data import split
from lmforge.data.readers.files import iter_sources, read_documents
from lmforge.data.sources import DataError, Document, ReadStats, embedded_corpus


def _cfg(**data) -> RunConfig:
    seed = data.pop("seed", 1337)
    return RunConfig.model_validate({"seed": seed, "data": data})


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# béta ✓\n", encoding="utf-8")
    with gzip.open(root / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gamma zipped")
    lines = [json.dumps({"id": "d1", "text": "delta one", "meta": {"k": 1}}), "", json.dumps({"text": "delta two"})]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with lzma.open(root / "e.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "e1", "text": "epsilon 🎉", "source": "web"}) + "\n")
    (root / "binary.txt").write_bytes(b"abc\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".hidden.txt").write_text("secret", encoding="utf-8")
    (root / "table.xlsx").write_text("a,b\n", encoding="utf-8")  # a type no reader knows
    return root


def test_folder_reads_supported_files_in_sorted_order(folder: Path) -> None:
    stats = ReadStats()
    docs = list(read_documents([str(folder)], stats))
    assert [d.id for d in docs] == ["a", "c", "d1", "d:3", "e1", "latin1", "sub/b"]
    assert [d.text for d in docs] == ["alpha text\n", "gamma zipped", "delta one", "delta two", "epsilon 🎉",
                                      "café", "# béta ✓\n"]
    assert docs[0].meta == {"path": str(folder / "a.txt"), "bytes": 11}
    assert docs[0].source == str(folder / "a.txt")
    assert docs[2].meta == {"k": 1, "path": str(folder / "d.jsonl"), "line": 1}  # provenance is always kept
    assert docs[3].meta == {"path": str(folder / "d.jsonl"), "line": 3}
    assert docs[4].source == "web"
    assert docs[5].meta["repaired_bytes"] == 1  # the latin-1 é, read as cp1252
    assert stats.documents == 7
    assert stats.files == 6
    assert stats.repaired_bytes == 1
    assert stats.skipped == {"binary": 1, "hidden": 1, "unsupported_type": 1}
    assert stats.examples["binary"] == [str(folder / "binary.txt")]


def test_explicit_binary_or_unsupported_file_is_an_error(folder: Path) -> None:
    with pytest.raises(DataError, match="binary.txt looks binary"):
        list(read_documents([str(folder / "binary.txt")]))
    (folder.parent / "noise.txt").write_bytes(bytes(range(1, 256)) * 4)  # no NUL, but mostly not text
    with pytest.raises(DataError, match="noise.txt is mostly not text"):
        list(read_documents([str(folder.parent / "noise.txt")]))
    with pytest.raises(DataError, match="table.xlsx: unsupported file type"):
        list(read_documents([str(folder / "table.xlsx")]))


def test_explicit_file_id_is_its_stem(folder: Path) -> None:
    docs = list(read_documents([str(folder / "c.txt.gz"), str(folder / "sub" / "b.md")]))
    assert [(d.id, d.text) for d in docs] == [("c", "gamma zipped"), ("b", "# béta ✓\n")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents([str(bad)]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "fine"}\n{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"missing\.jsonl:2: no text: the 'text' field is missing"):
        list(read_documents([str(missing)]))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: 'text' must be a string"):
        list(read_documents([str(wrong)]))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found: .*nowhere"):
        list(read_documents([str(tmp_path / "nowhere")]))


def test_document_json_round_trip() -> None:
    doc = Document(id="x", text="naïve 日本 🎉\n", source="s", meta={"n": 2})
    line = doc.to_json()
    assert "\n" not in line
    assert Document.from_json(line) == doc
    with pytest.raises(DataError):
        Document.from_json("{not json")


def test_embedded_corpus() -> None:
    docs = list(embedded_corpus())
    assert len(docs) == 42
    assert sum(len(d.text.encode("utf-8")) for d in docs) == 5_057_198
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert "hamlet" in {d.id for d in docs}
    assert [d.id for d in iter_sources([])][:3] == [d.id for d in docs[:3]]


# ------------------------------------------------------------------------ split
def _read(path: Path) -> list[Document]:
    return [Document.from_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def ten_docs(tmp_path: Path) -> Path:
    root = tmp_path / "ten"
    root.mkdir()
    for i in range(10):
        (root / f"doc{i}.txt").write_text(f"document number {i} " * (i + 1), encoding="utf-8")
    return root


def test_docs_split_holds_out_whole_documents(ten_docs: Path, tmp_path: Path) -> None:
    stats = split.main(_cfg(train=[str(ten_docs)], val_fraction=0.2), tmp_path / "out")
    train, val = _read(tmp_path / "out" / "train.jsonl"), _read(tmp_path / "out" / "val.jsonl")
    assert (stats["train_docs"], stats["val_docs"], stats["split"]) == (8, 2, "docs")
    assert sorted(d.id for d in train + val) == [f"doc{i}" for i in range(10)]
    originals = {f"doc{i}": f"document number {i} " * (i + 1) for i in range(10)}
    assert all(d.text == originals[d.id] for d in train + val)
    assert stats["val_ids"] == [d.id for d in val]
    assert stats["val_chars"] == sum(len(d.text) for d in val)
    assert stats["train_bytes"] + stats["val_bytes"] == sum(len(t.encode()) for t in originals.values())
    again = split.main(_cfg(train=[str(ten_docs)], val_fraction=0.2), tmp_path / "again")
    assert again["val_ids"] == stats["val_ids"]  # same seed, same choice


def test_val_docs_by_name(ten_docs: Path, tmp_path: Path) -> None:
    stats = split.main(_cfg(train=[str(ten_docs)], val_docs=["doc3", "doc7"]), tmp_path / "out")
    assert stats["val_ids"] == ["doc3", "doc7"]
    assert stats["train_docs"] == 8
    with pytest.raises(DataError, match=r"unknown document id\(s\) hamlet; available: doc0, doc1"):
        split.main(_cfg(train=[str(ten_docs)], val_docs=["hamlet"]), tmp_path / "bad")


def test_tail_split_cuts_at_the_character(tmp_path: Path) -> None:
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text("aaaa", encoding="utf-8")
    (root / "b.txt").write_text("béébéb", encoding="utf-8")  # 6 characters, 9 bytes
    stats = split.main(_cfg(train=[str(root)], split="tail", val_fraction=0.25), tmp_path / "out")
    # 10 characters; int(10 * 0.75) = 7 go to training: all of a, then "béé" of b.
    train, val = _read(tmp_path / "out" / "train.jsonl"), _read(tmp_path / "out" / "val.jsonl")
    assert [(d.id, d.text) for d in train] == [("a", "aaaa"), ("b", "béé")]
    assert [(d.id, d.text) for d in val] == [("b#tail", "béb")]
    assert val[0].meta["char_offset"] == 3
    assert (stats["train_chars"], stats["val_chars"], stats["val_bytes"]) == (7, 3, 4)


def test_explicit_validation_and_single_document_fallback(ten_docs: Path, tmp_path: Path) -> None:
    val_file = tmp_path / "held.txt"
    val_file.write_text("held out text", encoding="utf-8")
    stats = split.main(_cfg(train=[str(ten_docs)], val=[str(val_file)]), tmp_path / "out")
    assert (stats["train_docs"], stats["val_docs"], stats["split"]) == (10, 1, "explicit")
    one = split.main(_cfg(train=[str(ten_docs / "doc9.txt")]), tmp_path / "one")
    assert one["split"] == "tail" and "note" in one
    assert (one["train_docs"], one["val_docs"]) == (1, 1)
    assert one["val_chars"] == len("document number 9 " * 10) - int(len("document number 9 " * 10) * 0.9)


def test_empty_validation_set_is_an_error_naming_the_file(ten_docs: Path, tmp_path: Path, capsys) -> None:
    from lmforge.cli import main as cli_main

    empty, blank = tmp_path / "empty.txt", tmp_path / "blank"
    empty.write_text("", encoding="utf-8")
    blank.mkdir()
    (blank / "spaces.txt").write_text("  \n\t\n", encoding="utf-8")
    for val in (empty, blank):
        with pytest.raises(DataError, match=f"^no validation text in {re.escape(str(val))}$"):
            split.main(_cfg(train=[str(ten_docs)], val=[str(val)]), tmp_path / "out")
        assert not (tmp_path / "out" / "val.jsonl").exists()
    with pytest.raises(SystemExit) as stop:
        cli_main(["prepare", f"--runs_dir={tmp_path}", f"--data.train=[{ten_docs}]", f"--data.val=[{empty}]",
                  "--clean.enabled=false"])
    assert stop.value.code == 1
    assert f"error: no validation text in {empty}\n" in capsys.readouterr().err


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no training text in .*empty"):
        split.main(_cfg(train=[str(root)]), tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_embedded_corpus_default_split(tmp_path: Path) -> None:
    stats = split.main(RunConfig(), tmp_path / "docs")
    assert (stats["train_docs"], stats["val_docs"]) == (38, 4)  # round(0.1 * 42) = 4
    assert stats["train_bytes"] + stats["val_bytes"] == 5_057_198
    assert len(_read(tmp_path / "docs" / "val.jsonl")) == 4
