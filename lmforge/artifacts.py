"""Artifacts: how every stage writes its files, and how lmforge decides that a result can be reused.

One noun for four things that every stage needs, so that no stage keeps its own copy:

- **atomic writes**: :func:`write_text`, :func:`write_json`, :func:`write_bytes`, the streaming
  :class:`AtomicFile` and :func:`atomic_path` (for libraries that write a file by name). The new
  content goes to a temporary name in the same folder (``.NAME.PID.tmp``), is fsynced, renamed over
  the target, and the folder is fsynced: a reader sees the old file or the whole new one, never half,
  and a failed write leaves the old content and no temporary file. :func:`remove_temp` clears the
  temporaries a kill left behind.
- **file signatures**: :func:`file_signature` (path, size and mtime of every file: cheap for a corpus
  of any size) and :func:`content_digest` (a hash of the files' bytes, for small inputs whose mtime may
  change without their content, such as the fine-tuning sets shipped in the package).
- **manifests**: :func:`read_manifest` and :func:`write_manifest`, the ``manifest.json`` each stage
  writes beside its output (stage, format version, fingerprint, the config that shaped it, its inputs'
  fingerprints, its outputs and counts, its timing).
- **the fingerprint that decides reuse**: :func:`fingerprint` / :func:`reuse_key`, read from the
  ``reuse`` metadata that each config field declares once (:func:`lmforge.config.base.reuse`): for each
  stage, whether changing the field *invalidates* the stage's result, is *resumable* (the stage runs
  again, continuing from its checkpoints), or is *irrelevant* to it. A field without a mark for a stage
  takes the mark of the section that holds it. ::

    from lmforge import artifacts
    artifacts.fingerprint(cfg, "train")               # the train stage is done iff its manifest holds this
    artifacts.fingerprint(cfg, "train", resume=True)  # its checkpoints can be resumed iff they hold this
    artifacts.write_json(run_dir / "results.json", result)

This module imports nothing from lmforge but the config, so every package may use it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from lmforge.config.base import INVALIDATES, IRRELEVANT, RESUMABLE, ConfigError

FORMAT_VERSION = 1  # the manifest layout; also hashed into every stage fingerprint
MANIFEST = "manifest.json"
TEMP_SUFFIX = ".tmp"


class ArtifactError(ConfigError):
    """A run folder this lmforge cannot use (a manifest of a newer format); the message names the file.
    A ConfigError, so the CLI prints it without a traceback: the fix is another --name or an upgrade."""


# ------------------------------------------------------------------ atomic writes
def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under: same folder (so the rename is atomic), hidden."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; some systems (Windows) cannot open a folder, and need not."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_folder(path.parent)


class AtomicFile:
    """``path`` written under :func:`temp_path` and renamed over it on :meth:`commit`.

    As a context manager it yields the open file and commits on success, discards on an error::

        with AtomicFile(path, "w") as f:
            f.write(text)

    Streaming writers keep one open across calls and call :meth:`commit` or :meth:`discard` themselves.
    """

    def __init__(self, path: Path | str, mode: str = "wb", encoding: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        encoding = None if "b" in mode else encoding or "utf-8"
        self.file: IO[Any] = open(self.tmp, mode, encoding=encoding)  # noqa: SIM115 - closed by commit or discard

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            _publish(self.tmp, self.path)
        except BaseException:  # a full disk, a folder in the way: the old file stays, the temporary goes
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, and the flush may be what failed
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path for a library that writes a file by name; renamed over ``path`` if the body ends well."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path | str, data: bytes) -> None:
    with AtomicFile(path, "wb") as f:
        f.write(data)


def write_text(path: Path | str, text: str) -> None:
    with AtomicFile(path, "w") as f:
        f.write(text)


def write_json(path: Path | str, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON (unknown types as ``str``); serialised before the file is opened, so a bad
    object leaves the old file untouched."""
    text = json.dumps(obj, indent=indent, default=str)
    write_text(path, text + "\n" if indent is not None else text)


def remove_temp(folder: Path) -> list[Path]:
    """Delete the temporaries a killed write left in ``folder``; returns them."""
    found = sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


# ------------------------------------------------------------------ signatures
def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every file named, matched by a glob, or below a named folder, in a stable order."""
    for raw in paths:
        named = [Path(g) for g in sorted(glob.glob(str(raw)))] if glob.has_magic(str(raw)) else [Path(raw)]
        for path in named:
            yield from sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def file_signature(paths: Iterable[str | Path]) -> list[list]:
    """``[path, size, mtime_ns]`` of every file (``None``s for a missing one): a change re-runs the stage."""
    sig = []
    for f in _files(paths):
        st = f.stat() if f.exists() else None
        sig.append([str(f), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sig


def content_digest(paths: Iterable[str | Path]) -> str:
    """A hash of the names and bytes of every file: for small inputs whose mtime is no evidence."""
    h = hashlib.sha256()
    for f in _files(paths):
        h.update(str(f).encode())
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    """A short hash of ``obj`` as canonical JSON (sorted keys; unknown types as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ fingerprints
def _marks(model: type[BaseModel], name: str) -> tuple[dict[str, str], tuple[str, ...]]:
    extra = model.model_fields[name].json_schema_extra
    extra = extra if isinstance(extra, dict) else {}
    return dict(extra.get("reuse", {})), tuple(extra.get("reuse_top", ()))


def _added_at_default(section: BaseModel, name: str) -> bool:
    """A field marked ``reuse(added=True)`` that holds its default: fingerprints leave it out."""
    field = type(section).model_fields[name]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return bool(extra.get("reuse_added")) and getattr(section, name) == field.get_default(call_default_factory=True)


def reuse_key(cfg: BaseModel, stage: str, resume: bool = False) -> dict:
    """The config values that shape ``stage``'s result, nested as in the config.

    ``resume=False``: the fields marked invalidating or resumable (the stage is done iff they are
    unchanged); ``resume=True``: the invalidating ones alone (its partial results, such as
    checkpoints, can be continued iff they are unchanged).
    """
    counted = {INVALIDATES} if resume else {INVALIDATES, RESUMABLE}
    key: dict = {}
    _select(cfg, cfg.model_dump(), stage, counted, IRRELEVANT, key, key)
    return key


def _select(section: BaseModel, dumped: dict, stage: str, counted: set[str], inherited: str,
            into: dict, top: dict) -> None:
    for name in type(section).model_fields:
        marks, tops = _marks(type(section), name)
        mark = marks.get(stage, inherited)
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            sub: dict = {}
            _select(value, dumped[name], stage, counted, mark, sub, top)
            if sub:
                into[name] = sub
        elif mark in counted and not _added_at_default(section, name):
            # reuse_top: keyed by the field's own name, the layout of fingerprints written before the marks.
            (top if stage in tops else into)[name] = dumped[name]


def fingerprint(cfg: BaseModel, stage: str, resume: bool = False, **inputs: Any) -> str:
    """:func:`digest` of :func:`reuse_key` and the stage's ``inputs`` (signatures, upstream fingerprints)."""
    return digest({**reuse_key(cfg, stage, resume), **inputs})


# ------------------------------------------------------------------ manifests
def read_manifest(folder: Path) -> dict | None:
    """``folder/manifest.json``, or None when there is none or it cannot be parsed (the stage runs again)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    fmt = manifest.get("format")
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer lmforge (manifest format {fmt}, this one reads up "
                            f"to {FORMAT_VERSION}); upgrade lmforge, or use another --name for this run")
    return manifest


def write_manifest(folder: Path, stage: str, fingerprint: str, config: dict, inputs: dict, outputs: dict,
                   seconds: float) -> dict:
    """Write ``folder/manifest.json`` atomically (written last, it marks the stage done); returns it."""
    manifest = {"stage": stage, "format": FORMAT_VERSION, "fingerprint": fingerprint, "config": config,
                "inputs": inputs, "outputs": outputs, "seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest
