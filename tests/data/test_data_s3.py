"""``s3://`` sources against a real S3-compatible server on 127.0.0.1 (moto's server, started here),
read through s3fs as on AWS: globs across folders, gzip / zstd / Parquet, stable ids, the same shards
with one collect task or several, and one-line errors for a missing bucket or key.

Credentials come from the environment, as a user's would (``AWS_ACCESS_KEY_ID`` ...), so none is
written into the run's resolved config; ``storage_options.endpoint_url`` names the server.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.config import RunConfig
from lmforge.data import collect
from lmforge.data.shards import read_shard, shard_paths

TEXTS = [f"Record {i}: the ferry left the harbour at dawn with {i} crates of apples on deck." for i in range(9)]


def _jsonl(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t}) + "\n" for t in texts).encode("utf-8")


@pytest.fixture()
def endpoint(monkeypatch) -> Iterator[str]:
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "lmforge", "AWS_SECRET_ACCESS_KEY": "lmforge-secret",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    s3 = boto3.client("s3", endpoint_url=url)
    s3.create_bucket(Bucket="crawl")
    table = io.BytesIO()
    pq.write_table(pa.table({"text": TEXTS[4:6]}), table)
    objects = {"2024/a.jsonl.gz": gzip.compress(_jsonl(TEXTS[:4])), "2024/b.parquet": table.getvalue(),
               "2025/deep/c.jsonl.zst": zstandard.ZstdCompressor().compress(_jsonl(TEXTS[6:])),
               "2025/notes.md": b"not collected: the glob asks for data files"}
    for key, body in objects.items():
        s3.put_object(Bucket="crawl", Key=key, Body=body)
    yield url
    server.stop()


def _cfg(tmp_path: Path, url: str, endpoint: str, tasks: int) -> RunConfig:
    source = {"url": url, "storage_options": {"endpoint_url": endpoint}}
    return RunConfig.model_validate({"name": "s3", "runs_dir": str(tmp_path / "runs"),
                                     "collect": {"sources": [source]}, "data": {"tasks": tasks, "workers": 2}})


def _rows(out: Path) -> list[dict]:
    """The shards' records, each one's collected_at (the time of the run) left out."""
    rows = [json.loads(line) for p in shard_paths(out / "shards") for line in p.read_text().splitlines()]
    for row in rows:
        row["meta"].pop("collected_at")
    return rows


def _docs(out: Path) -> list[tuple[str, str]]:
    return [(d.id, d.text) for p in shard_paths(out / "shards") for d in read_shard(p)]


def test_an_s3_glob_is_collected_the_same_by_one_task_or_three(tmp_path: Path, endpoint: str) -> None:
    url = "s3://crawl/**/*.[jp]*"  # fsspec globs: *, **, ?, [...] (no braces)
    one = collect.main(_cfg(tmp_path, url, endpoint, 1), tmp_path / "one")
    assert _docs(tmp_path / "one") == ([(f"2024/a:{i + 1}", TEXTS[i]) for i in range(4)]
                                       + [(f"2024/b:{i + 1}", TEXTS[4 + i]) for i in range(2)]
                                       + [(f"2025/deep/c:{i + 1}", TEXTS[6 + i]) for i in range(3)])
    assert one["documents"] == 9 and one["bytes"] == sum(len(t.encode()) for t in TEXTS)
    assert one["accounting"] == {"in": 9, "kept": 9, "dropped": {}}
    three = collect.main(_cfg(tmp_path, url, endpoint, 3), tmp_path / "three")
    assert _rows(tmp_path / "three") == _rows(tmp_path / "one")
    assert three["documents"] == 9


@pytest.mark.parametrize(("url", "message"), [
    ("s3://no-such-bucket/*.jsonl", "s3://no-such-bucket/*.jsonl: "),
    ("s3://crawl/2023/*.jsonl.gz", "s3://crawl/2023/*.jsonl.gz: no file matches the pattern"),
    ("s3://crawl/2024/missing.jsonl", "s3://crawl/2024/missing.jsonl: not found"),
])
def test_a_missing_bucket_or_key_is_one_line_and_nothing_is_written(tmp_path: Path, endpoint: str, capsys,
                                                                      url: str, message: str) -> None:
    from lmforge.cli import main as cli_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: s3\nruns_dir: {tmp_path / 'runs'}\ncollect:\n  strict: true\n  sources:\n"
                      f"    - url: '{url}'\n      storage_options: {{endpoint_url: '{endpoint}'}}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        cli_main(["collect", "--config", str(recipe)])
    assert stop.value.code != 0
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "runs" / "s3" / "collect" / "manifest.json").exists()
    assert not shard_paths(tmp_path / "runs" / "s3" / "collect" / "shards")
