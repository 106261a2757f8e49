"""Shared fixtures: a small corpus of real works, and a helper to run the CLI in a fresh process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The measured CPU matmul peak (for MFU) is cached; keep the tests' cache out of the home folder.
os.environ.setdefault("LMFORGE_CACHE", tempfile.mkdtemp(prefix="lmforge-cache-"))

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-test.yaml"
SMALL_WORKS = ("sonnets", "tempest", "macbeth", "lovers_complaint", "phoenix_and_the_turtle")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Five works of the embedded corpus as .txt files (~300 KB): real text, quick to train on."""
    from lmforge.data.sources import embedded_corpus

    folder = tmp_path_factory.mktemp("corpus")
    for doc in embedded_corpus():
        if doc.id in SMALL_WORKS:
            (folder / f"{doc.id}.txt").write_text(doc.text, encoding="utf-8")
    return folder


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> int:
    """The process umask set to the parameter for one test; yields the mode a new file must get from it."""
    old = os.umask(request.param)
    yield 0o666 & ~request.param
    os.umask(old)


def file_modes(folder: Path) -> dict[str, int]:
    """The permission bits of every file under ``folder``, by path relative to it."""
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_when(marker: Path, *argv: str, timeout: float = 60) -> None:
    """Start ``python argv`` in a session of its own, wait until it creates ``marker`` (its way of saying where it
    is), then SIGKILL it and whatever it started, as ``kill -9`` on its process group would."""
    child = subprocess.Popen([sys.executable, *argv], cwd=ROOT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lmforge ARGS`` in a new Python process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def hf_family_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Hugging Face folder of every family in tests.hf_families.FAMILIES, built once per session."""
    from tests.hf_families import FAMILIES, make_folder

    root = tmp_path_factory.mktemp("families")
    return {name: make_folder(name, root) for name in FAMILIES}
