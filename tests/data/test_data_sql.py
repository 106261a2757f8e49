"""SQL sources against real databases: a SQLite file and a throwaway PostgreSQL server started here."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.data.readers.sql import read_sql
from lmforge.data.sources import DataError, ReadStats

ROWS = [(1, "The first note is about rivers and the sea.", "ann", "2024-01-02"),
        (2, None, "bob", "2024-01-03"),
        (3, "The third note is about mountains.", "cy", "2024-02-01")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the 'postgres' user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder on a free port; yields its SQLAlchemy URL."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if shutil.which("initdb")
                                                                      else [])
    if not bins or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    data = root / "data"
    subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lmforge",
                                      "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                      "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://lmforge:not-a-real-secret@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def sqlite_db(tmp_path: Path) -> Path:
    db = tmp_path / "notes.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER, body TEXT, author TEXT, created TEXT)")
        conn.executemany("INSERT INTO notes VALUES (?, ?, ?, ?)", ROWS)
    return db


def _check_rows(docs: list, stats: ReadStats) -> None:
    assert [(d.id, d.text) for d in docs] == [("1", ROWS[0][1]), ("3", ROWS[2][1])]
    assert docs[0].meta["author"] == "ann" and docs[0].meta["row"] == 1 and docs[1].meta["row"] == 3
    assert stats.skipped == {"no_text": 1} and stats.documents == 2


def test_sqlite_query_rows_become_documents(sqlite_db: Path) -> None:
    stats = ReadStats()
    docs = list(read_sql(f"sqlite:///{sqlite_db}", "SELECT id, body AS text, author FROM notes ORDER BY id",
                         "text", "id", stats, strict=False))
    _check_rows(docs, stats)
    assert docs[0].source == f"sqlite:///{sqlite_db}"


def test_failing_queries_name_the_database(sqlite_db: Path) -> None:
    with pytest.raises(DataError, match=r"sql sqlite:///.*notes\.db: query failed: .*no such table: nope"):
        list(read_sql(f"sqlite:///{sqlite_db}", "SELECT * FROM nope", "text", None, ReadStats(), strict=False))
    with pytest.raises(DataError, match=r"returns no column 'text' \(columns: id, body\); alias it"):
        list(read_sql(f"sqlite:///{sqlite_db}", "SELECT id, body FROM notes", "text", None, ReadStats(), strict=False))
    with pytest.raises(DataError, match="is not a database URL"):
        list(read_sql("not a url", "SELECT 1", "text", None, ReadStats(), strict=False))
    with pytest.raises(DataError, match="row 2: no text in 'text'"):
        list(read_sql(f"sqlite:///{sqlite_db}", "SELECT id, body AS text FROM notes ORDER BY id", "text", "id",
                      ReadStats(), strict=True))


def test_postgresql_query_rows_become_documents(postgres: str) -> None:
    import psycopg

    with psycopg.connect(postgres.replace(":not-a-real-secret", ""), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id INTEGER, body TEXT, author TEXT, created DATE)")
        for row in ROWS:
            conn.execute("INSERT INTO notes VALUES (%s, %s, %s, %s)", row)
    stats = ReadStats()
    docs = list(read_sql(postgres, "SELECT id, body AS text, author, created FROM notes ORDER BY id", "text", "id",
                         stats, strict=False))
    _check_rows(docs, stats)
    assert docs[0].meta["created"] == "2024-01-02"  # dates become strings in meta
    assert "not-a-real-secret" not in docs[0].source and "lmforge:***@" in docs[0].source
    with pytest.raises(DataError, match=r"query failed: .*relation \"missing\" does not exist"):
        list(read_sql(postgres, "SELECT body AS text FROM missing", "text", None, ReadStats(), strict=False))
