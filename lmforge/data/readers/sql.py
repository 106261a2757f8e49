"""SQL reader: the rows of a query as documents, through any SQLAlchemy database URL.

The query's ``text_field`` column is the text, ``id_field`` (optional) the id; every
other column of the row goes into ``meta`` (so ``SELECT body AS text, url, author
FROM posts`` keeps the url and author). Rows are streamed with a server-side cursor
where the driver has one, so a large table never sits in memory::

    for doc in read_sql("sqlite:///notes.db", "SELECT id, body AS text FROM notes",
                        text_field="text", id_field="id", stats=ReadStats(), strict=False):
        ...

``postgresql://`` URLs use psycopg (version 3) when psycopg2 is not installed.
Passwords never appear in messages or metadata. A failing connection or query
raises :class:`DataError` naming the database; the collect stage reports it and
goes on with its other sources unless ``collect.strict`` is set.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib.util
import re
from collections.abc import Iterator
from typing import Any

from lmforge.data.sources import DataError, Document, FileOptions, ReadStats, problem

FETCH_ROWS = 1000  # rows per round trip when streaming


def _driver_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg 3 when only that one is installed."""
    scheme, sep, rest = url.partition("://")
    if (scheme in ("postgresql", "postgres") and sep and importlib.util.find_spec("psycopg2") is None
            and importlib.util.find_spec("psycopg") is not None):
        return f"postgresql+psycopg://{rest}"
    return url


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and metadata."""
    return re.sub(r"^([\w+.-]+://[^/:@]*):[^/]*@", r"\1:***@", url)


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (dt.date, dt.time, decimal.Decimal)):
        return str(value)
    return None  # bytes, arrays and the like are no use as metadata


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def read_sql(url: str, query: str, text_field: str, id_field: str | None, stats: ReadStats,
             strict: bool) -> Iterator[Document]:
    """The rows of ``query`` as documents; raises :class:`DataError` when the database or query fails."""
    try:
        import sqlalchemy as sa
    except ImportError:
        raise DataError("sql sources need SQLAlchemy (pip install 'lmforge[data]')") from None

    try:
        parsed = sa.engine.make_url(_driver_url(url))
    except sa.exc.ArgumentError:
        raise DataError(f"sql: '{safe_url(url)}' is not a database URL (e.g. sqlite:///notes.db, "
                        "postgresql+psycopg://user@host/db)") from None
    safe = safe_url(parsed.render_as_string(hide_password=False))
    opts = FileOptions(text_field=text_field, id_field=id_field, strict=strict)
    try:
        engine = sa.create_engine(parsed)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
        raise DataError(f"sql {safe}: cannot use this database ({_first_line(e)})") from None
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=FETCH_ROWS).execute(sa.text(query))
            columns = list(result.keys())
            for column in (text_field, id_field):
                if column is not None and column not in columns:
                    raise DataError(f"sql {safe}: the query returns no column '{column}' "
                                    f"(columns: {', '.join(columns)}); alias it, e.g. SELECT body AS {column}")
            stats.files += 1
            for row_no, row in enumerate(result.mappings(), start=1):
                text = row[text_field]
                if not isinstance(text, str) or not text:
                    problem(stats, opts, "no_text", f"sql {safe}: row {row_no}: no text in '{text_field}'")
                    continue
                extra = {k: _json_safe(v) for k, v in row.items() if k not in (text_field, id_field)}
                meta = {**{k: v for k, v in extra.items() if v is not None}, "database": safe, "row": row_no}
                doc_id = str(row[id_field]) if id_field and row[id_field] is not None else f"{parsed.database}:{row_no}"
                stats.documents += 1
                yield Document(id=doc_id, text=text, source=safe, meta=meta)
    except sa.exc.SQLAlchemyError as e:
        raise DataError(f"sql {safe}: query failed: {_first_line(e)}") from None
    finally:
        engine.dispose()
