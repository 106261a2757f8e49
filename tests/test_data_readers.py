"""File, record and dataset readers: HTML, EPUB, CSV/TSV, Parquet, JSONL fields, compression, globs, datasets."""

from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import pytest

from lmforge.data.readers.records import read_dataset
from lmforge.data.sources import DataError, FileOptions, ReadStats, read_documents

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
             json.dumps({"content": "good two", "id": "x"})]
    (tmp_path / "mixed.jsonl").write_bytes("\n".join(lines).encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe"))
    stats = ReadStats()
    docs = list(read_documents([str(tmp_path / "mixed.jsonl")], stats, FileOptions(text_field="content",
                                                                                   strict=False)))
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [d.id for d in docs] == ["mixed:1", "x"]
    assert stats.skipped == {"malformed_line": 3}
    assert stats.examples["malformed_line"][0].endswith("mixed.jsonl:2: not valid JSON (Expecting property name "
                                                        "enclosed in double quotes at column 2)")
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


def test_binary_and_non_utf8_files_in_a_folder_are_counted(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "image.txt").write_bytes(bytes(range(256)))
    (tmp_path / "legacy.txt").write_bytes("Gr\xfc\xdfe".encode("latin-1"))
    (tmp_path / "page.html").write_bytes(b"<html>\x00\x01</html>")
    stats = ReadStats()
    assert [d.text for d in read_documents([str(tmp_path)], stats, FileOptions(strict=False))] == ["fine"]
    assert stats.skipped == {"binary": 2, "not_utf8": 1}


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
