"""Config sections of the data stages: ``collect`` (where documents come from) and ``clean``
(repair, filters, scrubbing, deduplication). Each field's description is its ``--help`` text."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section


# ------------------------------------------------------------------------ collect
class SourceConfig(Section):
    """One place documents come from: set exactly one of path, dataset, sql, or urls / urls_file / sitemap."""

    path: str | None = Field(None, description=(
        "file, folder (read recursively) or glob: .txt .md .html .epub .jsonl .csv .tsv .parquet, "
        "optionally compressed .gz/.xz/.bz2/.zst"))
    include: list[str] = Field(default_factory=list, description=(
        "folder filter: keep only files matching one of these globs (no '/' = file name, else path in the folder)"))
    exclude: list[str] = Field(default_factory=list, description="folder filter: skip files matching these globs")
    format: Literal["auto", "text", "html", "epub", "jsonl", "csv", "parquet"] = Field("auto", description=(
        "file format; auto = from the file name"))
    text_field: str = Field("text", description="JSONL / CSV / Parquet / dataset / SQL column holding the text")
    id_field: str | None = Field(None, description="column holding a document id (None = file:line or row number)")
    url: str | None = Field(None, description=(
        "fsspec URL of a file or glob, streamed (never copied whole): s3://, gs://, hf://, https://, file://, "
        "memory:// (s3 and gs need s3fs / gcsfs); formats as for path"))
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec options for url, e.g. {anon: true} for a public S3 bucket"))
    dataset: str | None = Field(None, description=(
        "Hugging Face dataset: a folder on disk (save_to_disk output or data files), else a name streamed "
        "from the Hub (load_dataset(..., streaming=True), never downloaded whole), or a builder such as "
        "json / parquet with data_files"))
    subset: str | None = Field(None, description="dataset configuration (subset) name, e.g. 'en' for allenai/c4")
    data_files: list[str] = Field(default_factory=list, description=(
        "data files for a builder dataset (json, parquet, csv, text): local paths or fsspec URLs"))
    split: str = Field("train", description="dataset split to read")
    max_documents: int = Field(0, ge=0, description=(
        "stop reading this source after this many documents (0 = no limit); for sampling a large stream"))
    max_bytes: int = Field(0, ge=0, description="stop reading this source after this many bytes of text (0 = no limit)")
    sql: str | None = Field(None, description=(
        "SQLAlchemy database URL, e.g. sqlite:///notes.db or postgresql+psycopg://user@host/db"))
    query: str | None = Field(None, description="SQL query whose rows are documents (with sql)")
    urls: list[str] = Field(default_factory=list, description="web pages to fetch (http/https)")
    urls_file: str | None = Field(None, description="file listing web pages, one URL per line (# comments)")
    sitemap: str | None = Field(None, description="URL of a sitemap (or sitemap index) listing the pages to fetch")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        """A bare string is a path, a web page when it starts with http:// or https://, else with a scheme a URL."""
        if isinstance(data, str):
            if data.startswith(("http://", "https://")):
                return {"urls": [data]}
            return {"url": data} if "://" in data else {"path": data}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        kinds = [k for k, on in (("path", self.path), ("url", self.url), ("dataset", self.dataset), ("sql", self.sql),
                                 ("web", self.urls or self.urls_file or self.sitemap)) if on]
        if len(kinds) != 1:
            raise ValueError("each collect.sources entry needs exactly one of path, url, dataset, sql, "
                             f"urls/urls_file/sitemap (got {', '.join(kinds) or 'none'})")
        if self.url is not None and "://" not in self.url:
            raise ValueError(f"collect.sources: url {self.url!r} has no scheme (s3://, https://, file://, ...)")
        if (self.sql is None) != (self.query is None):
            raise ValueError("collect.sources: sql and query go together")
        return self

    @property
    def kind(self) -> str:
        return ("path" if self.path else "url" if self.url else "dataset" if self.dataset
                else "sql" if self.sql else "web")


class WebConfig(Section):
    user_agent: str = Field("lmforge/0.1 (language model data collection)", description=(
        "User-Agent header, also the name matched against robots.txt"))
    robots: bool = Field(True, description="obey robots.txt (disallowed pages are skipped and counted)")
    delay_s: float = Field(1.0, ge=0.0, description=(
        "minimum seconds between two requests to the same host (robots.txt Crawl-delay raises it)"))
    timeout_s: float = Field(10.0, gt=0.0, description="seconds to wait for a connection or for data")
    retries: int = Field(2, ge=0, description="retries after a timeout, connection error, 429 or 5xx")
    backoff_s: float = Field(1.0, ge=0.0, description="first retry waits this long, then twice as long each time")
    max_bytes: int = Field(5_000_000, ge=1024, description="pages larger than this are skipped ('too_large')")
    max_pages: int = Field(0, ge=0, description="stop after this many pages per source (0 = no limit)")


class CollectConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description=(
        "where documents come from, besides the paths of data.train (both empty = the embedded corpus)"))
    web: WebConfig = Field(default_factory=WebConfig, description="web fetching: politeness, retries, limits")
    strict: bool = Field(False, description=(
        "stop at the first bad input (malformed line, unreadable file, failed query, failed page); "
        "false = skip it, count it and go on"))
    shard_mb: float = Field(32.0, gt=0.0, description="size of the JSONL shards written (MB of text)")


# -------------------------------------------------------------------------- clean
class NormalizeConfig(Section):
    html: bool = Field(True, description=(
        "documents that are HTML markup (e.g. raw pages in JSONL) are reduced to their main text (trafilatura)"))
    html_metadata: bool = Field(False, description=(
        "with html: also keep the page's title, author, date, site name and language in meta; trafilatura's "
        "metadata search (its date search reads the whole page) triples the extraction's CPU time"))
    fix_unicode: bool = Field(True, description="repair mojibake and HTML entities with ftfy")
    form: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalization form")
    whitespace: bool = Field(True, description=(
        "unify line endings and odd spaces, strip trailing spaces, at most one blank line in a row"))
    control_chars: bool = Field(True, description="remove control characters (NUL etc.; tab and newline stay)")
    lowercase: bool = Field(False, description="lowercase everything (classic recipe; off by default)")
    special_chars: bool = Field(False, description=(
        "remove characters other than letters, digits, whitespace and basic punctuation (classic recipe)"))


class LinesConfig(Section):
    navigation: bool = Field(True, description="remove menu / breadcrumb lines (short items between | » › · • >)")
    boilerplate: bool = Field(True, description=(
        "remove C4's boilerplate lines: javascript, cookie and privacy notices, terms of use"))
    lorem_ipsum: bool = Field(True, description="remove lines containing 'lorem ipsum'")
    min_words: int = Field(0, ge=0, description="remove lines with fewer words (C4 uses 3; 0 = keep all)")
    terminal_punct: bool = Field(False, description="keep only lines ending in . ! ? or a quote (C4; off: verse)")


class QualityConfig(Section):
    gopher_quality: bool = Field(True, description=(
        "Gopher (Rae et al. 2021) rules: word count, mean word length, symbols, bullets, ellipses, stop words"))
    gopher_repetition: bool = Field(False, description=(
        "Gopher repetition rules: duplicate lines, paragraphs, n-grams (off by default: plays repeat speaker names)"))
    c4: bool = Field(False, description=(
        "C4 (Raffel et al. 2020) page rules: curly brackets, lorem ipsum, fewer than 5 sentences"))
    fineweb: bool = Field(False, description=(
        "FineWeb (Penedo et al. 2024) rules: punctuated lines, short lines, duplicated-line characters"))
    min_words: int = Field(50, ge=0, description="Gopher: fewest words in a document")
    max_words: int = Field(100_000, ge=1, description="Gopher: most words in a document")
    min_mean_word_len: float = Field(3.0, ge=0.0, description="Gopher: smallest mean word length")
    max_mean_word_len: float = Field(10.0, gt=0.0, description="Gopher: largest mean word length")
    max_symbol_ratio: float = Field(0.1, ge=0.0, description="Gopher: most '#' and '...' per word")
    min_stop_words: int = Field(2, ge=0, description="Gopher: fewest of the, be, to, of, and, that, have, with")


class LanguageConfig(Section):
    enabled: bool = Field(True, description="identify each document's language with py3langid (meta.lang)")
    keep: list[str] = Field(default_factory=lambda: ["en"], description=(
        "ISO 639-1 codes to keep (empty = keep every language, still tagged)"))
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="drop documents whose best language is less sure")
    max_chars: int = Field(2000, ge=100, description=(
        "characters read from each document to decide (py3langid, scored in numpy, reads about 6 MB per CPU-second)"))


class PIIConfig(Section):
    emails: bool = Field(True, description="replace e-mail addresses")
    phones: bool = Field(True, description="replace phone numbers (international and common national formats)")
    ips: bool = Field(True, description="replace IPv4 and IPv6 addresses")
    email_replacement: str = Field("email@example.com", description="what an e-mail address becomes")
    phone_replacement: str = Field("<PHONE>", description="what a phone number becomes")
    ip_replacement: str = Field("192.0.2.1", description="what an IP address becomes (an address reserved for docs)")


class DedupConfig(Section):
    exact: bool = Field(True, description="drop documents whose normalised text was seen before")
    near: bool = Field(True, description="drop near-duplicates (MinHash LSH)")
    # Defaults chosen from the measured recall / false-positive curve in docs/data.md (benchmarks/dedup_curve.py).
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description=(
        "estimated Jaccard similarity of the shingle sets that makes a near-copy (0.5 with 3-word shingles "
        "catches copies with up to about 8% of words changed; docs/data.md has the curve)"))
    num_perm: int = Field(128, ge=16, le=1024, description=(
        "MinHash permutations (LSH bands x rows follow from this and the threshold)"))
    shingle_words: int = Field(3, ge=1, description="words per shingle")
    decontaminate: list[str] = Field(default_factory=list, description=(
        "evaluation files or folders: drop training documents sharing a long n-gram with them "
        "(data.val and eval.text are added automatically)"))
    ngram: int = Field(13, ge=3, description="decontamination n-gram length in words (13 as in GPT-3)")


class CleanConfig(Section):
    enabled: bool = Field(True, description="false = pass the collected documents through unchanged (still counted)")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="character-level repair")
    lines: LinesConfig = Field(default_factory=LinesConfig, description="line-level filters")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="document quality filters")
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="language identification")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="personal data scrubbing")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="deduplication and decontamination")
    rejects: bool = Field(True, description="write dropped documents with their reason to clean/rejects/")
    rejects_max_chars: int = Field(0, ge=0, description="keep this many characters of a rejected text (0 = all)")
