"""py3langid's language identifier, scored with numpy instead of a per-byte Python loop, with the same results.

py3langid finds its n-gram features by walking a byte DFA one byte at a time in Python. That DFA is an
Aho-Corasick automaton: its state after byte ``i`` is the longest suffix of the bytes read so far that is
one of its n-grams. No n-gram is longer than the deepest state's distance from the root (``depth``, found
by a breadth-first search when the model loads), so the state after byte ``i`` is also the state reached by
walking from the root over bytes ``i-depth+1 .. i`` alone. ``depth`` vectorised steps give every state at
once. Features are then counted in the order of their first occurrence, the order in which py3langid's
``Counter`` holds them, so the float32 sums (and so every ``(lang, probability)``) are bitwise the same.

The bundled model is LZMA-compressed; its arrays are unpacked once into ``$LMFORGE_CACHE/py3langid/`` and
later processes map them from there (``np.load(mmap_mode="r")``)::

    from lmforge.data.langid import load_identifier
    load_identifier().classify("Ceci est une phrase.")   # ('fr', 0.99...)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from py3langid.langid import MODEL_DIR, MODEL_FILE, RAW_FLOOR, LanguageIdentifier
from py3langid.modelio import load_model

from lmforge.cache import cache_dir

_ARRAYS = ("ptc", "pc", "nextmove", "row", "output")


class VectorIdentifier(LanguageIdentifier):
    """py3langid's :class:`LanguageIdentifier` with the DFA walk vectorised; only ``_raw_score`` differs."""

    __slots__ = ("_depth", "_moves", "_rows", "_outputs")

    def __init__(self, *args, depth: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._moves = _as_uint(self.tk_nextmove).astype(np.uint32, copy=False)  # np.take writes into uint32 states
        # a row's offset in the flat transition table; every offset + 255 fits uint32 (checked below)
        self._rows = _as_uint(self.tk_row).astype(np.uint32) << np.uint32(8)
        self._outputs = np.asarray(self.tk_output, dtype=np.int32)
        if len(self._moves) >= 1 << 32:
            raise ValueError(f"py3langid model: {len(self._moves)} DFA transitions do not fit uint32 offsets")
        self._depth = dfa_depth(self._moves, _as_uint(self.tk_row)) if depth is None else depth

    @property
    def depth(self) -> int:
        """The deepest DFA state's distance from the root (the longest n-gram, in bytes)."""
        return self._depth

    def _states(self, data: bytes) -> np.ndarray:
        """The DFA state after each byte of ``data``."""
        text = np.frombuffer(data, dtype=np.uint8)
        n = len(text)
        state, offset = np.zeros(n, dtype=np.uint32), np.empty(n, dtype=np.uint32)
        for k in range(min(self._depth, n) - 1, -1, -1):
            # state[i] holds the walk from the root over text[i-k+1 .. i]; prepend byte i-k to it
            step = offset[: n - k]
            self._rows.take(state[k:], out=step)
            step += text[: n - k]
            self._moves.take(step, out=state[k:])
        return state

    def _raw_score(self, text: bytes) -> np.ndarray:
        features = self._outputs[self._states(text)]
        features = features[features >= 0]
        if not len(features):
            fill = 0.0 if self._norm_probs else RAW_FLOOR
            return np.full(len(self.nb_classes), fill, dtype=np.float32)
        order, counts = first_occurrence_counts(features)
        # the same expression as py3langid's _sparse_score, over the same features in the same order
        return np.log1p(counts.astype(np.float32)) @ self.nb_ptc[order] + self.nb_pc


def first_occurrence_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``values`` in order of first occurrence, and how often each occurs."""
    counts = np.bincount(values)
    first = np.full(len(counts), len(values), dtype=np.int64)
    positions = np.arange(len(values))
    np.minimum.at(first, values, positions)
    in_order = values[first[values] == positions]
    return in_order, counts[in_order]


def _as_uint(values) -> np.ndarray:
    """An ``array.array`` or numpy array of unsigned ints as a numpy array, without copying."""
    if isinstance(values, np.ndarray):
        return values
    dtypes = {2: np.uint16, 4: np.uint32, 8: np.uint64}
    return np.frombuffer(values, dtype=dtypes[values.itemsize])


def dfa_depth(moves: np.ndarray, rows: np.ndarray) -> int:
    """Breadth-first search from the root (state 0): the largest distance of any reachable state.

    ``moves`` holds 256 next states per row, ``rows`` the row of each state.
    """
    reached = np.zeros(len(rows), dtype=bool)
    reached[0] = True
    frontier, depth = np.zeros(1, dtype=np.int64), 0
    table = moves.reshape(-1, 256)
    while True:
        following = np.unique(table[np.unique(rows[frontier])])
        frontier = following[~reached[following]]
        if not len(frontier):
            return depth
        reached[frontier] = True
        depth += 1


@lru_cache(maxsize=1)
def load_identifier() -> VectorIdentifier:
    """py3langid's bundled model (probabilities normalised), from lmforge's cache of its unpacked arrays."""
    model = MODEL_DIR / MODEL_FILE
    folder = cache_dir() / "py3langid" / _model_key(model)
    if not (folder / "meta.json").exists():
        _unpack(model, folder)
    arrays = {name: np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r")) for name in _ARRAYS}
    meta = json.loads((folder / "meta.json").read_text())
    return VectorIdentifier(arrays["ptc"], arrays["pc"], meta["classes"], arrays["nextmove"],
                            arrays["output"], norm_probs=True, tk_row=arrays["row"], depth=meta["depth"])


def _model_key(model: Path) -> str:
    """Names one version of the model file: its path, size and modification time."""
    stat = model.stat()
    return hashlib.sha256(f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _unpack(model: Path, folder: Path) -> None:
    """Decompress ``model`` into ``folder`` as .npy files; written aside and renamed, so readers never see half."""
    ptc, pc, classes, nextmove, row, output = load_model(model)
    # the float16 table widened (exactly) once here: py3langid's matmul widens the rows it gathers on every call
    arrays = {"ptc": np.asarray(ptc, dtype=np.float32), "pc": np.asarray(pc), "nextmove": _as_uint(nextmove),
              "row": _as_uint(row), "output": np.asarray(output, dtype=np.int32)}
    depth = dfa_depth(arrays["nextmove"], arrays["row"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".unpacking-"))
    try:
        for name, values in arrays.items():
            np.save(scratch / f"{name}.npy", values)
        (scratch / "meta.json").write_text(json.dumps({"classes": classes, "depth": depth}))
        scratch.chmod(0o755)
        os.replace(scratch, folder)
    except OSError:
        if not (folder / "meta.json").exists():  # not another process's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
