"""File, record and dataset readers: HTML, EPUB, CSV/TSV, Parquet, JSONL fields, compression, globs, datasets."""

from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import pytest

from lmforge.data.readers.files import read_documents
from lmforge.data.readers.records import read_dataset
from lmforge.data.sources import DataError, FileOptions, ReadStats

PAGE = """<!doctype html><html><head><title>Bread</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/shop">Shop</a></li><li><a href="/c">Contact</a></li></ul></nav>
<article><h1>A short history of bread</h1>
<p>Bread is one of the oldest prepared foods. Evidence from thirty thousand years ago in Europe revealed
starch residue on rocks used for pounding plants.</p>
<p>Around ten thousand years before our era, with the spread of agriculture, grains became the mainstay
of making bread, and yeast spores were everywhere to leaven it.</p></article>
<footer>Copyright 2024 Example Bakery | Privacy policy | Terms of use</footer></body></html>"""


def _epub(path: Path, chapters: list[tuple[str, str]]) -> None:
    """A minimal valid EPUB 3: container, package with spine, one XHTML file per chapter."""
    items = "".join(f'<item id="c{i}" href="text/c{i}.xhtml" media-type="application/xhtml+xml"/>'
                    for i in range(len(chapters)))
    # The spine lists the chapters in reverse file order: reading order must follow the spine.
    spine = "".join(f'<itemref idref="c{i}"/>' for i in reversed(range(len(chapters))))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container version="1.0" '
                   'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
                   '<rootfile full-path="OEBPS/book.opf" media-type="application/oebps-package+xml"/>'
                   '</rootfiles></container>')
        z.writestr("OEBPS/book.opf", '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" '
                   'version="3.0"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>Tiny Tales</dc:title>'
                   f'<dc:creator>A. Writer</dc:creator><dc:language>en</dc:language></metadata><manifest>{items}'
                   f'</manifest><spine>{spine}</spine></package>')
        for i, (title, body) in enumerate(chapters):
            z.writestr(f"OEBPS/text/c{i}.xhtml", f'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml">'
                       f"<head><title>{title}</title></head><body><h1>{title}</h1><p>{body}</p></body></html>")


def test_html_file_keeps_the_article_and_drops_the_boilerplate(tmp_path: Path) -> None:
    (tmp_path / "bread.html").write_text(PAGE, encoding="utf-8")
    [doc] = read_documents([str(tmp_path / "bread.html")])
    assert "oldest prepared foods" in doc.text and "mainstay" in doc.text
    assert "Privacy policy" not in doc.text and "Contact" not in doc.text
    assert doc.meta["title"] == "A short history of bread"
    assert doc.id == "bread"


def test_epub_chapters_in_spine_order(tmp_path: Path) -> None:
    first = "The first chapter tells how the miller found a cat in the barn and kept it through the winter."
    second = "The second chapter tells how the cat caught every mouse in the mill before the spring came."
    _epub(tmp_path / "tales.epub", [("Second", second), ("First", first)])  # spine reverses: First, then Second
    [doc] = read_documents([str(tmp_path / "tales.epub")])
    assert doc.text.index("miller found a cat") < doc.text.index("caught every mouse")
    assert doc.meta["title"] == "Tiny Tales" and doc.meta["author"] == "A. Writer" and doc.meta["chapters"] == 2
    (tmp_path / "broken.epub").write_bytes(b"PK\x03\x04 not really a zip")
    stats = ReadStats()
    assert list(read_documents([str(tmp_path)], stats, FileOptions(strict=False)))[0].id == "tales"
    assert stats.skipped == {"unreadable": 1}


def test_csv_tsv_and_parquet_with_chosen_fields(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "posts.csv").write_text('key,body\n7,"first post, with a comma"\n8,""\n9,"third\nline two"\n',
                                        encoding="utf-8")
    (tmp_path / "notes.tsv").write_text("key\tbody\n1\ttab separated\n", encoding="utf-8")
    pq.write_table(pa.table({"key": [10, 11], "body": ["parquet one", None]}), tmp_path / "rows.parquet",
                   row_group_size=1)
    stats = ReadStats()
    opts = FileOptions(text_field="body", id_field="key", strict=False)
    docs = list(read_documents([str(tmp_path)], stats, opts))
    assert [(d.id, d.text) for d in docs] == [("1", "tab separated"), ("7", "first post, with a comma"),
                                              ("9", "third\nline two"), ("10", "parquet one")]
    assert docs[1].meta == {"path": str(tmp_path / "posts.csv"), "row": 1}
    assert docs[3].meta["row"] == 1
    assert stats.skipped == {"no_text": 2}  # the empty CSV cell and the null Parquet value
    with pytest.raises(DataError, match=r"posts\.csv: no column 'text'"):
        list(read_documents([str(tmp_path / "posts.csv")]))


def test_jsonl_text_field_and_malformed_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"content": "good one"}), "{broken", json.dumps({"content": 5}), "\xff\xfe",
             json.dumps({"content": "good two", "id": "x"}), '{"content": "cut sho', json.dumps({"text": "elsewhere"}),
             json.dumps({"content": None}), '{"content": "cut sho']  # the last line has no newline
    (tmp_path / "mixed.jsonl").write_bytes("\n".join(lines).encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe"))
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path / "mixed.jsonl")], stats, FileOptions(text_field="content",
                                                                                   strict=False)))
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [d.id for d in docs] == ["mixed:1", "x"]
    # Valid JSON without the text is no_text (as docs/data.md says); broken JSON or a wrong type is malformed.
    assert stats.skipped == {"malformed_line": 5, "no_text": 2}
    where = str(tmp_path / "mixed.jsonl")
    assert stats.examples["malformed_line"] == [
        f"{where}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{where}:3: 'content' must be a string, got int",
        f"{where}:4: not valid JSON (Expecting value at column 1)",
        f"{where}:6: not valid JSON (Invalid control character at column 21)",  # the newline inside the string
        f"{where}:9: not valid JSON (Unterminated string starting at column 13)"]
    assert stats.examples["no_text"] == [f"{where}:7: no text: the 'content' field is missing",
                                         f"{where}:8: no text: the 'content' field is null"]
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: not valid JSON"):
        list(read_documents([str(tmp_path / "mixed.jsonl")], None, FileOptions(text_field="content", strict=True)))


def test_compression_globs_and_filters(tmp_path: Path) -> None:
    import zstandard

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt.bz2").write_bytes(bz2.compress(b"bzip two text"))
    (tmp_path / "keep" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "zstd line one"}\n{"text": "zstd line two"}\n'))
    (tmp_path / "keep" / "drafts").mkdir()
    (tmp_path / "keep" / "drafts" / "c.txt").write_text("draft", encoding="utf-8")
    (tmp_path / "keep" / "d.md").write_text("markdown", encoding="utf-8")
    stats = ReadStats()
    opts = FileOptions(include=["*.bz2", "*.zst", "drafts/*"], exclude=["drafts/*"])
    docs = list(read_documents([str(tmp_path / "keep")], stats, opts))
    assert [d.text for d in docs] == ["bzip two text", "zstd line one", "zstd line two"]
    assert stats.skipped == {"excluded": 2}
    globbed = list(read_documents([str(tmp_path / "keep" / "*.md")]))
    assert [d.text for d in globbed] == ["markdown"]
    with pytest.raises(DataError, match="no file matches the pattern"):
        list(read_documents([str(tmp_path / "*.nothing")]))


def test_binary_and_mostly_non_text_files_in_a_folder_are_counted(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "image.txt").write_bytes(bytes(range(256)))
    (tmp_path / "legacy.txt").write_bytes("Gr\xfc\xdfe".encode("latin-1"))
    (tmp_path / "page.html").write_bytes(b"<html>\x00\x01</html>")
    (tmp_path / "noise.txt").write_bytes(bytes(range(1, 256)) * 8)  # no NUL: 63% control or non-UTF-8 bytes
    (tmp_path / "noise.jsonl").write_bytes(bytes(range(1, 256)) * 8)
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path)], stats, FileOptions(strict=False)))
    assert [d.text for d in docs] == ["Grüße", "fine"]  # the latin-1 file is kept, repaired
    assert stats.skipped == {"binary": 2, "not_text": 2}
    assert sorted(stats.examples["not_text"]) == [str(tmp_path / "noise.jsonl"), str(tmp_path / "noise.txt")]


def test_one_bad_byte_keeps_the_whole_text_file(tmp_path: Path) -> None:
    text = "ROMEO: It is my lady, O, it is my love!\n" * 50 + "JULIET: Romeo’s letter ✓\n" + "The end.\n" * 50
    data = text.encode("utf-8").replace("’".encode(), b"\x92")  # one cp1252 apostrophe in a UTF-8 file
    (tmp_path / "play.txt").write_bytes(data)
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path / "play.txt")], stats))
    assert [d.text for d in docs] == [text]
    assert docs[0].meta["repaired_bytes"] == 1 and stats.repaired_bytes == 1 and stats.skipped == {}


def test_mixed_utf8_and_cp1252_file_keeps_both_parts(tmp_path: Path) -> None:
    utf8 = "Café — naïve “quotes” ✓\n"
    cp1252 = "Déjà vu: “smart quotes” – and ’s, €5\n"
    undefined = b"odd \x81 byte\n"  # one of the five bytes cp1252 leaves undefined
    (tmp_path / "mixed.md").write_bytes(utf8.encode("utf-8") + cp1252.encode("cp1252") + undefined
                                        + utf8.encode("utf-8"))
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path / "mixed.md")], stats))
    assert [d.text for d in docs] == [utf8 + cp1252 + "odd \ufffd byte\n" + utf8]
    assert stats.repaired_bytes == 7 + 1  # é à “ ” – ’ € (one byte each in cp1252) and 0x81


def test_records_repair_bad_bytes_per_field(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "don\x92t stop"}\n{"text": "caf\xc3\xa9 and caf\xe9"}\n')
    # Before the fix a bad byte in a CSV cost the rest of the file: the third row must survive too.
    (tmp_path / "b.csv").write_bytes(b'id,text\nr\xe91,"na\xefve, \x93quoted\x94"\nr2,plain\nr3,"last row"\n')
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path)], stats, FileOptions(id_field=None)))
    assert [d.text for d in docs] == ["don’t stop", "café and café", "naïve, “quoted”", "plain", "last row"]
    assert [d.meta.get("repaired_bytes", 0) for d in docs] == [1, 1, 3, 0, 0]
    assert stats.repaired_bytes == 5 and stats.skipped == {}
    by_id = list(read_documents([str(tmp_path / "b.csv")], ReadStats(), FileOptions(id_field="id")))
    assert [d.id for d in by_id] == ["ré1", "r2", "r3"]


def test_hugging_face_datasets_on_disk(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["one", "two", ""], "n": [1, 2, 3]}),
                               "test": datasets.Dataset.from_dict({"content": ["held"], "n": [9]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    stats = ReadStats()
    docs = list(read_dataset(str(tmp_path / "saved"), "train", "content", "n", stats, strict=False))
    assert [(d.id, d.text, d.meta["split"]) for d in docs] == [("1", "one", "train"), ("2", "two", "train")]
    assert stats.skipped == {"no_text": 1}
    with pytest.raises(DataError, match="no split 'validation'"):
        list(read_dataset(str(tmp_path / "saved"), "validation", "content", None, ReadStats(), strict=False))
    files = tmp_path / "files" / "data"
    files.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["from a data file"]}), files / "train-00000.parquet")
    docs = list(read_dataset(str(tmp_path / "files"), "train", "text", None, ReadStats(), strict=False))
    assert [(d.id, d.text) for d in docs] == [("files:1", "from a data file")]
