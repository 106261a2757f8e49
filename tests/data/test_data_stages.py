"""The collect and clean stages end to end: accounting, rejects, data card, bad input, strict mode, resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from lmforge.cli import main as cli_main
from lmforge.config import RunConfig
from lmforge.data import collect, curate
from lmforge.data.shards import read_shard, shard_paths
from lmforge.data.sources import DataError, embedded_corpus
from lmforge.pipeline import run

GERMAN = ("Der Fluss fließt an der alten Mühle vorbei und hinunter ins Tal, wo die Bauern seit jeher Weizen "
          "und Gerste anbauen. Im Frühling steigt das Wasser, und die Kinder des Dorfes gehen am Ufer entlang, "
          "um zu sehen, wie hoch es gekommen ist. Der Müller schreibt jedes Hochwasser an die Wand der Mühle, "
          "damit die Leute, die dort wohnen, einen Frühling mit dem anderen vergleichen können.")


@pytest.fixture(scope="module")
def works() -> dict[str, str]:
    return {d.id: d.text for d in embedded_corpus() if d.id in ("sonnets", "tempest", "macbeth", "hamlet")}


def _cfg(tmp: Path, **sections: object) -> RunConfig:
    return RunConfig.model_validate({"name": "t", "runs_dir": str(tmp / "runs"), **sections})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, works) -> tuple[Path, Path, dict[str, str]]:
    """A messy folder: good text, a copy, a near-copy, German, junk, mojibake, HTML, PII, bad files.

    Files are read in sorted order, so the copies (zz_*) come after the original and are the ones dropped.
    """
    root = tmp_path_factory.mktemp("mixed")
    corpus = root / "corpus"
    corpus.mkdir()
    # Slices without trailing spaces, so that text needing no repair can be checked to pass unchanged.
    texts = {name: "\n".join(line.rstrip() for line in works[name][5000:9000].split("\n")).strip()
             for name in ("sonnets", "tempest", "macbeth")}
    (corpus / "sonnets.txt").write_text(texts["sonnets"], encoding="utf-8")
    (corpus / "tempest.txt").write_text(texts["tempest"] + "\nWrite to prospero@isle.example.org for more.",
                                        encoding="utf-8")
    (corpus / "zz_copy.txt").write_text(texts["sonnets"].upper(), encoding="utf-8")
    near = texts["sonnets"].split(" ")
    for i in (40, 200, 400):
        near[i] = "changed"
    (corpus / "zz_near.txt").write_text(" ".join(near), encoding="utf-8")
    (corpus / "german.txt").write_text(GERMAN, encoding="utf-8")
    (corpus / "mojibake.txt").write_text(texts["macbeth"].replace("the", "thé", 3).encode("utf-8")
                                         .decode("cp1252", errors="replace"), encoding="utf-8")
    page = (f"<html><body><nav>Home | Plays | Poems</nav><article><p>{works['hamlet'][9000:11000]}</p></article>"
            "<footer>Privacy policy</footer></body></html>")
    (corpus / "page.html").write_text(page, encoding="utf-8")
    lines = [json.dumps({"id": "junk", "text": "Buy the best cheap watches now and click here to order them today."}),
             "{not json",
             json.dumps({"id": "hamlet-bit", "text": works["hamlet"][20000:24000]})]
    (corpus / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (corpus / "picture.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    # The evaluation file shares a passage with the JSONL record: that record must go.
    evalset = root / "eval.txt"
    evalset.write_text(works["hamlet"][21000:21400], encoding="utf-8")
    return corpus, evalset, texts


def test_mixed_corpus_is_fully_accounted_for(tmp_path: Path, mixed) -> None:
    corpus, evalset, texts = mixed
    cfg = _cfg(tmp_path, data={"train": [str(corpus)]}, clean={"dedup": {"decontaminate": [str(evalset)]}})
    out = run(cfg, until="clean")
    col, cl = out["collect"], out["clean"]
    assert col["documents"] == 9 and col["skipped"] == {"binary": 1, "malformed_line": 1}
    rejected = [json.loads(line) for line in (cfg.run_dir / "collect" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == ["binary", "malformed_line"]
    assert any("records.jsonl:2: not valid JSON" in r["where"] for r in rejected)

    assert cl["dropped"] == {"wrong_language": 1, "too_few_words": 1, "contaminated": 1, "exact_duplicate": 1,
                             "near_duplicate": 1}
    assert cl["documents"] == {"in": 9, "kept": 4, "dropped": 5}
    card = json.loads((cfg.run_dir / "clean" / "data_card.json").read_text())
    b = card["clean"]["bytes"]
    assert b["in"] == b["kept"] + b["dropped"] + b["edited"]
    steps = card["clean"]["steps"]
    assert steps["language"]["dropped"] == 1 and steps["dedup"]["in"] == 6 and steps["dedup"]["dropped"] == 2
    assert card["clean"]["languages"] == {"en": 4}
    assert card["clean"]["examples"]["wrong_language"][0]["id"] == "german"
    assert (cfg.run_dir / "clean" / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    # The drop table: every reason once, under its stage and step, documents and bytes adding up.
    drops = {(r["stage"], r["step"], r["reason"]): r["documents"] for r in card["drops"]}
    assert drops == {("collect", "read", "binary"): 1, ("collect", "read", "malformed_line"): 1,
                     ("clean", "language", "wrong_language"): 1, ("clean", "gopher_quality", "too_few_words"): 1,
                     ("clean", "decontaminate", "contaminated"): 1, ("clean", "dedup", "exact_duplicate"): 1,
                     ("clean", "dedup", "near_duplicate"): 1}
    assert {r["reason"]: r["bytes"] for r in card["drops"] if r["stage"] == "clean"} == card["clean"]["dropped_bytes"]

    kept = {d.id: d for s in shard_paths(cfg.run_dir / "clean" / "docs") for d in read_shard(s)}
    assert sorted(kept) == ["mojibake", "page", "sonnets", "tempest"]
    assert "thé" in kept["mojibake"].text and "Ã" not in kept["mojibake"].text
    assert "email@example.com" in kept["tempest"].text and "prospero@" not in kept["tempest"].text
    assert "Privacy policy" not in kept["page"].text and kept["page"].meta["path"].endswith("page.html")
    assert kept["sonnets"].text == texts["sonnets"]  # good text passes unchanged
    assert kept["sonnets"].meta["sha1"] and kept["sonnets"].meta["lang"] == "en"
    dup_rejects = [json.loads(line) for f in (cfg.run_dir / "clean" / "rejects").glob("*.dedup.jsonl")
                   for line in f.read_text().splitlines()]
    assert sorted((r["id"], r["reason"], r["detail"]) for r in dup_rejects) == [
        ("zz_copy", "exact_duplicate", "copy of sonnets"), ("zz_near", "near_duplicate", "copy of sonnets")]


def test_bad_sources_are_reported_and_the_rest_goes_on(tmp_path: Path, works) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.txt").write_text(works["macbeth"][:3000], encoding="utf-8")
    (tmp_path / "empty").mkdir()
    db = tmp_path / "notes.db"
    sqlite3.connect(db).close()
    sources = [str(tmp_path / "empty"), {"sql": f"sqlite:///{db}", "query": "SELECT body AS text FROM missing"},
               str(tmp_path / "nowhere"), str(good)]
    cfg = _cfg(tmp_path, collect={"sources": sources})
    result = run(cfg, until="collect")["collect"]  # through the pipeline: the sources go into config.yaml too
    assert "sources: [{path:" in (cfg.run_dir / "config.yaml").read_text()
    assert result["documents"] == 1
    assert result["skipped"] == {"empty_source": 1, "source_failed": 2}
    assert [s["skipped"] for s in result["sources"]] == [{"empty_source": 1}, {"source_failed": 1},
                                                         {"source_failed": 1}, {}]
    assert "no such table: missing" in result["sources"][1]["examples"]["source_failed"][0]
    strict = _cfg(tmp_path, collect={"sources": sources, "strict": True})
    with pytest.raises(DataError, match="no such table: missing"):
        collect.main(strict, tmp_path / "strict")
    nothing = _cfg(tmp_path, collect={"sources": [str(tmp_path / "empty")]})
    with pytest.raises(DataError, match="no documents collected from .*empty"):
        collect.main(nothing, tmp_path / "nothing")


def test_strict_flag_stops_at_a_malformed_line(tmp_path: Path, works) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "bad.jsonl").write_text(json.dumps({"text": works["tempest"][:2000]}) + "\n{oops\n", encoding="utf-8")
    common = ["collect", f"--runs_dir={tmp_path}", f"--data.train=[{corpus}]"]
    with pytest.raises(SystemExit) as stop:
        cli_main([*common, "--name=strict", "--strict"])
    assert stop.value.code == 1
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        collect.main(_cfg(tmp_path, data={"train": [str(corpus)]}, collect={"strict": True}), tmp_path / "x")
    cli_main([*common, "--name=lenient"])
    manifest = json.loads((tmp_path / "lenient" / "collect" / "manifest.json").read_text())
    assert manifest["outputs"]["documents"] == 1 and manifest["outputs"]["skipped"] == {"malformed_line": 1}


def test_default_cleaning_leaves_real_works_intact(tmp_path: Path, small_corpus: Path) -> None:
    cfg = _cfg(tmp_path, data={"train": [str(small_corpus)]})
    out = run(cfg, until="clean")["clean"]
    assert out["documents"] == {"in": 5, "kept": 5, "dropped": 0}
    assert out["bytes"]["kept"] >= 0.995 * out["bytes"]["in"]  # only blank-line runs and trailing spaces go


def test_cleaning_switched_off_passes_everything_through(tmp_path: Path, mixed) -> None:
    corpus, _, _ = mixed
    cfg = _cfg(tmp_path, data={"train": [str(corpus)]}, clean={"enabled": False})
    out = run(cfg, until="clean")["clean"]
    assert out["documents"] == {"in": 9, "kept": 9, "dropped": 0} and out["steps"] == []
    kept = [d for s in shard_paths(cfg.run_dir / "clean" / "docs") for d in read_shard(s)]
    assert [d.id for d in kept] == [d.id for s in shard_paths(cfg.run_dir / "collect" / "shards")
                                    for d in read_shard(s)]


def test_non_utf8_bytes_are_repaired_and_counted_in_the_data_card(tmp_path: Path, works) -> None:
    from lmforge.data.data_card import card_summary

    corpus = tmp_path / "c"
    corpus.mkdir()
    play = works["tempest"][:3000]
    # One cp1252 apostrophe in a UTF-8 file: before the fix the whole file was dropped as not_utf8.
    (corpus / "one_byte.txt").write_bytes(play.replace(" the ", " the master@s ", 1).encode("utf-8")
                                          .replace(b"@", b"\x92"))
    macbeth = works["macbeth"]
    mixed = macbeth[:1500].encode("utf-8") + "\nDéjà “vu”\n".encode("cp1252") + macbeth[1500:3000].encode("utf-8")
    (corpus / "mixed.txt").write_bytes(mixed)
    (corpus / "noise.txt").write_bytes(bytes(range(1, 256)) * 8)  # mostly not text: still dropped, with its reason
    cfg = _cfg(tmp_path, data={"train": [str(corpus)]})
    out = run(cfg, until="clean")
    assert out["collect"]["documents"] == 2 and out["collect"]["skipped"] == {"not_text": 1}
    card = json.loads((cfg.run_dir / "clean" / "data_card.json").read_text())
    assert card["collect"]["repaired_bytes"] == 1 + 4  # ’, and é à “ ” of the cp1252 line
    assert card["collect"]["sources"][0]["repaired_bytes"] == 5
    assert card_summary(card)["collect repaired bytes (not UTF-8)"] == 5
    kept = {d.id: d.text for s in shard_paths(cfg.run_dir / "clean" / "docs") for d in read_shard(s)}
    assert sorted(kept) == ["mixed", "one_byte"]
    assert "the master’s " in kept["one_byte"] and kept["one_byte"].endswith(play[-200:].rstrip())
    assert "Déjà “vu”" in kept["mixed"] and works["macbeth"][2800:2900].strip() in kept["mixed"]


def test_too_many_words_hint_names_max_words(tmp_path: Path, works) -> None:
    from lmforge.config import QualityConfig

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "long.txt").write_text(works["tempest"][:4000], encoding="utf-8")
    cfg = _cfg(tmp_path, data={"train": [str(corpus)]}, clean={"quality": {"max_words": 100}})
    with pytest.raises(DataError, match=r"\(too_many_words\): set --clean\.quality\.max_words=N or") as e:
        run(cfg, until="clean")
    assert "min_words" not in str(e.value)
    for option in "".join(curate.GOPHER_OPTIONS.values()).replace(" / ", "").split("--clean.quality.")[1:]:
        assert option.split("=")[0] in QualityConfig.model_fields  # every option a hint names exists
