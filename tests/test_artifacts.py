"""lmforge.artifacts: atomic writes, file signatures, manifests, and the reuse fingerprint read from the
``reuse`` marks on the config fields (unit tests, and one pipeline run that skips, resumes or refuses)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from lmforge import artifacts, pipeline
from lmforge.config import ConfigError, RunConfig, load_config
from lmforge.config.base import INVALIDATES, IRRELEVANT, RESUMABLE, REUSE_MARKS, Section, reuse
from tests.conftest import TINY


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(artifacts.TEMP_SUFFIX))


# ------------------------------------------------------------------ atomic writes
def test_atomic_writes_replace_the_file_and_leave_no_temp(tmp_path: Path):
    artifacts.write_json(tmp_path / "a.json", {"x": 1})
    artifacts.write_json(tmp_path / "a.json", {"x": 2})
    artifacts.write_text(tmp_path / "sub" / "b.txt", "é\n")  # the folder is created
    artifacts.write_bytes(tmp_path / "c.bin", b"\x00\x01")
    with artifacts.AtomicFile(tmp_path / "d.jsonl", "w") as f:
        f.write("1\n")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "d.jsonl").read_text() == "1\n"
    assert _temps(tmp_path) == [] and _temps(tmp_path / "sub") == []


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "results.json"
    artifacts.write_json(path, {"kept": True})
    with pytest.raises(TypeError):  # a tuple key cannot be written as JSON
        artifacts.write_json(path, {("not", "a", "string"): 1})
    with pytest.raises(ZeroDivisionError), artifacts.AtomicFile(path, "w") as f:  # fails halfway through
        f.write('{"half": ')
        _ = 1 / 0
    with pytest.raises(ZeroDivisionError), artifacts.atomic_path(path) as tmp:
        tmp.write_text("{}")
        _ = 1 / 0
    assert json.loads(path.read_text()) == {"kept": True}
    assert _temps(tmp_path) == []


def test_a_write_that_cannot_be_renamed_leaves_no_temp(tmp_path: Path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        artifacts.write_bytes(tmp_path / "taken", b"data")
    assert (tmp_path / "taken").is_dir() and _temps(tmp_path) == []


def test_streaming_writer_discards_and_remove_temp_clears_a_killed_write(tmp_path: Path):
    writer = artifacts.AtomicFile(tmp_path / "shard.jsonl", "w")
    writer.write("partial\n")
    assert _temps(tmp_path) == [f".shard.jsonl.{os.getpid()}.tmp"]  # hidden, in the same folder
    writer.discard()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".manifest.json.123.tmp").write_text("{")  # what a kill leaves behind
    (tmp_path / "keep.txt").write_text("x")
    assert [p.name for p in artifacts.remove_temp(tmp_path)] == [".manifest.json.123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ signatures
def test_file_signature_walks_files_folders_and_globs(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bb")
    (tmp_path / "a.txt").write_text("a")
    sig = artifacts.file_signature([tmp_path / "a.txt", tmp_path / "d", tmp_path / "missing.txt"])
    assert [row[:2] for row in sig] == [[str(tmp_path / "a.txt"), 1], [str(tmp_path / "d" / "b.txt"), 2],
                                        [str(tmp_path / "missing.txt"), None]]
    assert artifacts.file_signature([str(tmp_path / "*.txt")]) == sig[:1]
    before = artifacts.content_digest([tmp_path / "d"])
    assert artifacts.content_digest([str(tmp_path / "d" / "*.txt")]) == before
    (tmp_path / "d" / "b.txt").write_text("bc")  # same size, other bytes
    assert artifacts.content_digest([tmp_path / "d"]) != before


# ------------------------------------------------------------------ manifests
def test_manifests_round_trip_and_older_ones_still_read(tmp_path: Path):
    written = artifacts.write_manifest(tmp_path / "pack", "pack", "ab12", {"context": 32}, {"docs": "cd34"},
                                       {"val": {"bytes": 10}}, 1.5)
    assert artifacts.read_manifest(tmp_path / "pack") == written
    assert written["format"] == artifacts.FORMAT_VERSION and written["seconds"] == 1.5
    # As lmforge wrote them before this module (same keys, no trailing newline).
    old = {"stage": "eval", "format": 1, "fingerprint": "0f", "config": {}, "inputs": {}, "outputs": {"val": 1},
           "seconds": 2.0, "finished_at": "2026-01-01T00:00:00+0000"}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "manifest.json").write_text(json.dumps(old, indent=2))
    assert artifacts.read_manifest(tmp_path / "eval") == old
    (tmp_path / "eval" / "manifest.json").write_text('{"stage": "eval", "outp')  # damaged: the stage runs again
    assert artifacts.read_manifest(tmp_path / "eval") is None
    assert artifacts.read_manifest(tmp_path / "nowhere") is None
    (tmp_path / "eval" / "manifest.json").write_text(json.dumps({**old, "format": 99}))
    with pytest.raises(ConfigError, match="newer lmforge.*format 99"):
        artifacts.read_manifest(tmp_path / "eval")


# ------------------------------------------------------------------ fingerprints
class _Inner(Section):
    lr: float = 1.0  # no mark: the section's (invalidates)
    steps: int = Field(10, json_schema_extra=reuse(job=RESUMABLE))
    log_every: int = Field(1, json_schema_extra=reuse(job=IRRELEVANT))
    width: int = Field(4, json_schema_extra=reuse(top=("pack",), pack=INVALIDATES))


class _Outer(Section):
    name: str = "x"  # no mark anywhere: irrelevant to every stage
    seed: int = Field(0, json_schema_extra=reuse(job=INVALIDATES))
    inner: _Inner = Field(default_factory=_Inner, json_schema_extra=reuse(job=INVALIDATES))


def test_reuse_key_follows_the_marks_and_their_inheritance():
    cfg = _Outer()
    assert artifacts.reuse_key(cfg, "job") == {"seed": 0, "inner": {"lr": 1.0, "steps": 10, "width": 4}}
    assert artifacts.reuse_key(cfg, "job", resume=True) == {"seed": 0, "inner": {"lr": 1.0, "width": 4}}
    assert artifacts.reuse_key(cfg, "pack") == {"width": 4}  # top: keyed by its own name
    assert artifacts.reuse_key(cfg, "other") == {}
    with pytest.raises(ValueError, match="reuse marks"):
        reuse(job="invalidate")


def _marks(model: type[BaseModel], prefix: str = "") -> dict[str, dict]:
    """Every field's own reuse marks, by dotted name."""
    out = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        out[prefix + name] = extra.get("reuse", {})
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_marks(field.annotation, f"{prefix}{name}."))
    return out


def _mark(dotted: str, stage: str) -> str:
    """The mark that holds for ``dotted`` in ``stage``: its own, else its section's, else irrelevant."""
    marks, mark = _marks(RunConfig), IRRELEVANT
    parts = dotted.split(".")
    for i in range(len(parts)):
        mark = marks[".".join(parts[: i + 1])].get(stage, mark)
    return mark


def test_every_mark_names_a_pipeline_stage_and_a_known_effect():
    for key, stages in _marks(RunConfig).items():
        assert set(stages) <= {*pipeline.ORDER, "bakeoff"}, key  # bakeoff: the compare-archs plan
        assert set(stages.values()) <= set(REUSE_MARKS), key
    assert _mark("train.steps", "train") == RESUMABLE and _mark("train.log_every", "train") == IRRELEVANT
    assert _mark("train.lr", "train") == INVALIDATES and _mark("name", "train") == IRRELEVANT


@pytest.mark.parametrize("stage", ["train", "eval", "finetune", "sample"])
def test_changing_a_field_does_what_its_mark_says(stage: str):
    """Read from the marks: an invalidating field changes both fingerprints, a resumable one only the
    stage's (the stage runs again and continues from its checkpoints), an irrelevant one neither."""
    cfg = load_config(TINY, ["finetune.enabled=true"])
    checked = set()
    for dotted in _marks(RunConfig):
        section, _, name = dotted.partition(".")
        value = getattr(getattr(cfg, section), name) if name and "." not in name else None
        if not isinstance(value, int | float):  # bools are ints; numbers are enough to cover every mark
            continue
        sub = getattr(cfg, section)
        other = cfg.model_copy(update={section: sub.model_copy(update={name: not value if isinstance(value, bool)
                                                                       else value + 1})})
        done = artifacts.fingerprint(other, stage) != artifacts.fingerprint(cfg, stage)
        partial = artifacts.fingerprint(other, stage, resume=True) != artifacts.fingerprint(cfg, stage, resume=True)
        expected = {INVALIDATES: (True, True), RESUMABLE: (True, False), IRRELEVANT: (False, False)}
        assert (done, partial) == expected[_mark(dotted, stage)], dotted
        checked.add(_mark(dotted, stage))
    assert checked == ({*REUSE_MARKS} if stage in ("train", "finetune") else {INVALIDATES, IRRELEVANT})


def test_fingerprints_are_those_written_before_the_marks():
    """Runs on disk stay valid: the same config gives the same fingerprints as the key lists it replaced
    (values computed with lmforge 752666f's pipeline._train_keys, loop.train_fingerprint and friends)."""
    cfg = RunConfig()
    # clean changed twice, on purpose: clean.workers left the config when the stage moved to datatrove tasks
    # (data.tasks / data.workers, which do not change its result; 8ad314d5cc3a2f9c before), and
    # clean.normalize.html_metadata came in, off, with pages' metadata no longer kept by default and
    # near-duplicates confirmed on the whole signature: runs cleaned before are cleaned again (904a8c9dad3a80c2).
    expected = {"collect": "d038fae8d2052d05", "clean": "543f9a2d61188f4e", "docs": "4dda660ac032db51",
                "tokenizer": "5eb44899d83842ab", "pack": "7c3e4afcd0859305", "train": "10a0fc49ec11209c",
                "eval": "fdaa51775405c956", "sample": "976d2e19ecc65761"}
    inputs = {"collect": "inputs", "clean": "eval", "docs": "inputs"}  # file signatures, left out of `expected`
    got = {s: artifacts.digest({k: v for k, v in pipeline.STAGES[s].keys(cfg).items() if k != inputs.get(s)})
           for s in expected}
    assert got == expected
    assert artifacts.digest(pipeline.STAGES["finetune"].keys(cfg)) == "b86c8ad9a72841ba"  # switched off
    assert artifacts.fingerprint(cfg, "train", resume=True, data="abc") == "6e0e3f8d6a40d526"


# ------------------------------------------------------------------ the pipeline
def test_the_train_stage_skips_resumes_or_refuses_as_the_marks_say(tmp_path: Path, small_corpus: Path, capsys):
    base = [f"runs_dir={tmp_path}", f"data.train=[{small_corpus}]", "train.steps=10", "train.ckpt_every=5"]

    def run(*extra: str) -> dict:
        return pipeline.run(load_config(TINY, [*base, *extra]), until="train")

    run()
    manifest = artifacts.read_manifest(tmp_path / "tiny" / "train")
    capsys.readouterr()
    assert _mark("train.log_every", "train") == IRRELEVANT
    run("train.log_every=1")
    assert "[train] up to date, skipped" in capsys.readouterr().out
    assert artifacts.read_manifest(tmp_path / "tiny" / "train") == manifest
    assert _mark("train.steps", "train") == RESUMABLE
    out = run("train.steps=12")
    assert "resumed from" in capsys.readouterr().out and out["train"]["steps"] == 12
    assert _mark("train.lr", "train") == INVALIDATES  # its checkpoints cannot be continued with another lr
    with pytest.raises(ConfigError, match="another model/train config"):
        run("train.steps=12", "train.lr=1e-3")


def test_a_field_added_later_keeps_fingerprints_while_at_its_default():
    """model.hf_config came after runs were on disk: unset, it leaves the train fingerprint as it was; set,
    it changes it (a different model)."""
    plain = RunConfig()
    wrapped = RunConfig.model_validate({"model": {"arch": "hf", "hf_config": {"model_type": "qwen3"}}})
    assert "hf_config" not in artifacts.reuse_key(plain, "train")["model"]
    assert artifacts.reuse_key(wrapped, "train")["model"]["hf_config"] == {"model_type": "qwen3"}
    assert artifacts.fingerprint(plain, "train") != artifacts.fingerprint(
        RunConfig.model_validate({"model": {"hf_config": {"model_type": "qwen3"}, "arch": "hf"}}), "train")
