"""Streamed collect sources, offline: fsspec URLs (http from a local server, file://, memory://) and
datasets streamed by builder name; counts, stable ids, limits, and one-line errors."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.config import RunConfig
from lmforge.data import collect
from lmforge.data.shards import read_shard, shard_paths
from lmforge.data.sources import DataError

TEXTS = [f"Document {i}: the river ran past the mill, and the miller counted sacks of grain." for i in range(6)]


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode("utf-8")


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "site" / "corpus"
    folder.mkdir(parents=True)
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(TEXTS[:4])))
    (folder / "b.txt").write_text(TEXTS[4], encoding="utf-8")
    (folder / "c.jsonl").write_bytes(_jsonl(TEXTS[5:]))
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        if self.path.endswith("broken.jsonl"):  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"text": "cut')
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


@pytest.fixture()
def server(corpus: Path) -> Iterator[str]:
    handler = functools.partial(_Handler, directory=str(corpus.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _cfg(tmp_path: Path, sources: list, **collect_opts: object) -> RunConfig:
    return RunConfig.model_validate(
        {"name": "s", "runs_dir": str(tmp_path / "runs"), "collect": {"sources": sources, **collect_opts}}
    )


def _docs(out: Path) -> list[tuple[str, str]]:
    return [(d.id, d.text) for p in shard_paths(out / "shards") for d in read_shard(p)]


def test_http_glob_is_streamed_with_stable_ids_and_counts(tmp_path: Path, server: str) -> None:
    cfg = _cfg(tmp_path, [{"url": f"{server}/corpus/*.jsonl*"}, {"url": f"{server}/corpus/b.txt"}])
    first = collect.main(cfg, tmp_path / "one")
    assert _docs(tmp_path / "one") == [(f"a:{i + 1}", TEXTS[i]) for i in range(4)] + [
        ("c:1", TEXTS[5]),
        ("b", TEXTS[4]),
    ]
    assert first["documents"] == 6 and first["bytes"] == sum(len(t.encode()) for t in TEXTS)
    assert [(s["source"].rsplit("/", 1)[-1], s["kind"], s["documents"], s["files"]) for s in first["sources"]] == [
        ("*.jsonl*", "url", 5, 2),
        ("b.txt", "url", 1, 1),
    ]
    assert first["accounting"] == {"in": 6, "kept": 6, "dropped": {}}
    collect.main(cfg, tmp_path / "two")
    assert _docs(tmp_path / "two") == _docs(tmp_path / "one")  # the same ids, in the same order


def test_file_and_memory_urls_and_the_limits(tmp_path: Path, corpus: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from upath import UPath

    UPath("memory://lmforge-test/deep/x.jsonl").write_bytes(_jsonl(TEXTS))
    with UPath("memory://lmforge-test/p/rows.parquet").open("wb") as f:
        pq.write_table(pa.table({"body": TEXTS[2:4]}), f)
    sources = [
        {"url": f"file://{corpus}/*", "include": ["*.txt"]},
        {"url": "memory://lmforge-test/**/*.jsonl", "max_documents": 2},
        {"url": "memory://lmforge-test/deep/x.jsonl", "max_bytes": len(TEXTS[0]) + 1},
        {"url": "memory://lmforge-test/p/*.parquet", "text_field": "body"},
    ]
    result = collect.main(_cfg(tmp_path, sources), tmp_path / "out")
    assert _docs(tmp_path / "out") == [
        ("b", TEXTS[4]),
        ("deep/x:1", TEXTS[0]),
        ("deep/x:2", TEXTS[1]),
        ("x:1", TEXTS[0]),
        ("x:2", TEXTS[1]),
        ("rows:1", TEXTS[2]),
        ("rows:2", TEXTS[3]),
    ]
    assert [(s["documents"], s["limited"]) for s in result["sources"]] == [(1, False), (2, True), (2, True), (2, False)]


def test_a_dataset_builder_is_streamed_with_its_own_ids(tmp_path: Path, corpus: Path) -> None:
    sources = [
        {"dataset": "json", "data_files": [str(corpus / "c.jsonl"), str(corpus / "a.jsonl.gz")], "max_documents": 3}
    ]
    result = collect.main(_cfg(tmp_path, sources), tmp_path / "out")
    assert _docs(tmp_path / "out") == [("c:train:1", TEXTS[5]), ("c:train:2", TEXTS[0]), ("c:train:3", TEXTS[1])]
    assert result["sources"][0]["source"] == "dataset json [train]" and result["sources"][0]["limited"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"url": "memory://lmforge-test/nowhere.jsonl"}, "memory://lmforge-test/nowhere.jsonl: not found"),
        ({"url": "http://127.0.0.1:9/corpus.jsonl"}, "http://127.0.0.1:9/corpus.jsonl: not found"),
        ({"url": "gopherx://host/a.jsonl"}, "gopherx://host/a.jsonl: cannot open this URL"),
        ({"dataset": "nobody/no-such-dataset"}, "dataset nobody/no-such-dataset [train]: cannot stream it"),
        ({"dataset": "json", "data_files": ["CORPUS/c.jsonl"], "text_field": "body"}, "no column 'body'"),
    ],
)
def test_bad_streamed_sources_are_one_line_errors(
    tmp_path: Path, corpus: Path, source: dict, expected: str, monkeypatch
) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Offline, a Hub name fails at once, as it does without a network (rather than after retries).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = {
        k: [str(corpus / v.removeprefix("CORPUS/")) for v in val] if k == "data_files" else val
        for k, val in source.items()
    }
    with pytest.raises(DataError) as err:
        collect.main(_cfg(tmp_path, [source], strict=True), tmp_path / "out")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not shard_paths(tmp_path / "out" / "shards")  # nothing half-written left behind


def test_a_connection_cut_mid_file_fails_the_source_and_leaves_no_shard(tmp_path: Path, server: str) -> None:
    url = f"{server}/broken.jsonl"
    with pytest.raises(DataError, match=rf"{url}: read failed"):
        collect.main(_cfg(tmp_path, [{"url": url}], strict=True), tmp_path / "strict")
    assert not shard_paths(tmp_path / "strict" / "shards")
    # Not strict: the source is counted as failed, and with nothing else collected the stage stops.
    with pytest.raises(DataError, match="no documents collected from .*broken.jsonl.*source_failed"):
        collect.main(_cfg(tmp_path, [{"url": url}]), tmp_path / "lenient")


def test_cli_reports_a_missing_url_on_one_line(tmp_path: Path, capsys) -> None:
    from lmforge.cli import main as cli_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: s\nruns_dir: {tmp_path / 'runs'}\n"
        "collect:\n  sources:\n    - url: memory://lmforge-test/absent/*.jsonl\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as stop:
        cli_main(["collect", "--config", str(recipe)])
    assert stop.value.code != 0
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error")]
    assert len(err) == 1 and "memory://lmforge-test/absent/*.jsonl" in err[0]
    assert not (tmp_path / "runs" / "s" / "collect" / "manifest.json").exists()


def test_a_bare_url_string_is_a_url_source() -> None:
    cfg = _cfg(Path("/tmp"), ["s3://bucket/crawl/*.jsonl.zst", "https://example.org/page.html", "notes/"])
    assert [s.kind for s in cfg.collect.sources] == ["url", "web", "path"]
    with pytest.raises(ValueError, match="has no scheme"):
        _cfg(Path("/tmp"), [{"url": "bucket/crawl.jsonl"}])


def test_a_url_source_goes_through_the_pipeline_and_is_reused(tmp_path: Path, corpus: Path) -> None:
    from lmforge.pipeline import run

    cfg = _cfg(tmp_path, [{"url": f"file://{corpus}/*.jsonl*", "storage_options": {"auto_mkdir": False}}])
    first = run(cfg, until="collect")["collect"]
    assert first["documents"] == 5
    assert "url: 'file://" in (cfg.run_dir / "config.yaml").read_text()  # the resolved config keeps it
    manifest = cfg.run_dir / "collect" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert run(cfg, until="collect")["collect"]["documents"] == 5
    assert manifest.stat().st_mtime_ns == stamp  # reused, not read again
