"""Checkpoints: exact round trip, atomic writes, pruning, damage detection and strict loading."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from lmforge.train import checkpoint as ckpt_mod
from lmforge.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    SingleFile,
    load,
    load_weights,
    read_state,
    resolve,
    verify,
)
from lmforge.train.weights import write_safetensors
from tests.conftest import file_modes


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> linear head, optionally tied, following the LanguageModel forward contract."""

    def __init__(self, vocab: int = 16, d: int = 8, tie: bool = True, extra: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        if extra:
            self.proj = nn.Linear(d, d)

    def forward(self, idx, targets=None):
        logits = self.head(self.norm(self.emb(idx)))  # (B, T, V)
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _trained(seed: int = 0, **kw) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        idx = torch.randint(0, 16, (2, 5))
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _save(ck: Checkpointer, step: int, model: nn.Module, opt, state: dict) -> Path:
    """Write checkpoint ``step`` of these parts with ``ck`` (its folder, settings and what it has verified)."""
    ck.model, ck.optimizer, ck.state = model, opt, state
    return ck.write(step)


def _save_steps(tmp_path: Path, steps, keep_last: int = 10) -> Checkpointer:
    ck = Checkpointer(tmp_path / "ckpt", keep_last=keep_last)
    for s in steps:
        model, opt = _trained(seed=s)
        _save(ck, s, model, opt, {"step": s})
    return ck


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path / "ckpt")
    state = {"step": 7, "loader": {"pos": [1, 2]}, "val": {"loss": 1.5}}
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    path = _save(ck, 7, model, opt, state)
    expected = _draws()

    assert path == tmp_path / "ckpt" / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "checksums.json"])
    sums = json.loads((path / "checksums.json").read_text())
    assert set(sums) == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert all(sums[f]["bytes"] == (path / f).stat().st_size for f in sums)

    fresh, fresh_opt = _trained(seed=99)
    _draws()  # move every generator away from the saved state
    loaded = Checkpointer(tmp_path / "ckpt", fresh, fresh_opt).load(path)
    assert loaded == state
    assert _draws() == expected
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert want.keys() == got.keys()
    for k in want:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(want[k][field], got[k][field])
    # The tie survives: one tensor stored, both names restored and still shared.
    assert fresh.head.weight is fresh.emb.weight
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "norm.bias", "norm.weight"]
    weights = load_weights(path)
    assert torch.equal(weights["head.weight"], model.emb.weight.detach())
    assert read_state(path) == state
    served = TinyLM()
    assert load(path, served, restore_rng=False) == state
    assert torch.equal(served.emb.weight, model.emb.weight)


def test_resumed_training_matches_uninterrupted(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path)
    path = _save(ck, 2, model, opt, {})
    torch.manual_seed(5)
    idx = torch.randint(0, 16, (2, 5))
    model(idx, idx)[1].backward()
    opt.step()

    other, other_opt = _trained(seed=3)
    Checkpointer(tmp_path, other, other_opt).load(path, restore_rng=False)
    other(idx, idx)[1].backward()
    other_opt.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_save_writes_when_due_and_keeps_last(tmp_path):
    ck = _save_steps(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert [p.name for p in ck.list()] == ["step_000003", "step_000004"]
    model, opt = _trained()
    every = Checkpointer(tmp_path / "every", model, opt, {}, every=250, keep_last=5)
    assert [every.save(s) is not None for s in (249, 250, 500, 501)] == [False, True, True, False]
    assert every.save(501, last_step=True) == tmp_path / "every" / "step_000501"
    assert [p.name for p in every.list()] == ["step_000250", "step_000500", "step_000501"]
    assert Checkpointer(tmp_path / "zero", model, opt, {}, every=0).save(500) is None
    assert not (tmp_path / "zero").exists()


def test_save_error_policy_stops_or_goes_on_but_never_skips_the_last_step(tmp_path, monkeypatch):
    """A disk error while saving: ``stop`` ends with one line naming folder and errno; ``continue`` warns
    and trains on, except at the last step; the failed write leaves no debris and the older one intact."""
    model, opt = _trained()
    real_replace = ckpt_mod.os.replace

    def full_disk(src, dst):  # the rename of a sealed checkpoint folder fails as on a full disk
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError(28, "No space left on device", str(src))
        real_replace(src, dst)

    for policy in ("stop", "continue"):
        ck = Checkpointer(tmp_path / policy, model, opt, {}, every=1, on_error=policy)
        assert ck.save(1) is not None
        monkeypatch.setattr(ckpt_mod.os, "replace", full_disk)
        if policy == "stop":
            with pytest.raises(CheckpointError, match=r"could not write checkpoint step 2 to .*stop: \[Errno 28\].*"
                                                      r"step_000001, is intact"):
                ck.save(2)
        else:
            assert ck.save(2) is None  # reported on stderr; training goes on
            with pytest.raises(CheckpointError, match=r"step 3 .*\(it is the last step's: the run's result\)"):
                ck.save(3, last_step=True)
        monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
        assert sorted(p.name for p in (tmp_path / policy).iterdir()) == ["step_000001"]


def test_saving_an_earlier_step_removes_the_abandoned_later_ones(tmp_path):
    ck = _save_steps(tmp_path, [10, 20, 30])
    model, opt = _trained()
    _save(ck, 20, model, opt, {"step": 20, "again": True})
    assert [p.name for p in ck.list()] == ["step_000010", "step_000020"]
    assert read_state(ck.list()[-1]) == {"step": 20, "again": True}


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: _truncate(p / "model.safetensors"), "truncated"),
    (lambda p: _flip_bit(p / "model.safetensors"), "sha256"),
    (lambda p: (p / "checksums.json").unlink(), "did not finish"),
    (lambda p: (p / "rng.pt").unlink(), "rng.pt is missing"),
])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, reason):
    newest = _save_steps(tmp_path, [1, 2, 3]).list()[-1]
    damage(newest)
    ck = Checkpointer(tmp_path / "ckpt")  # a new process: nothing verified yet
    with warnings.catch_warnings():  # said in a plain line on stderr, not as a Python warning with its source
        warnings.simplefilter("error")
        assert ck.latest_valid() == tmp_path / "ckpt" / "step_000002"
    with pytest.raises(CheckpointError, match=f"step_000003 is damaged: .*{reason}"):
        Checkpointer(tmp_path / "ckpt", TinyLM()).load(newest)
    with pytest.raises(CheckpointError, match=f"step_000003 is damaged: .*{reason}"):
        load(newest, TinyLM())
    with pytest.raises(CheckpointError, match="damaged"):
        verify(newest)


def test_loading_weights_only_reads_what_it_needs(tmp_path):
    newest = _save_steps(tmp_path, [1]).list()[-1]
    _flip_bit(newest / "optimizer.pt")
    model = TinyLM()
    assert load(newest, model, restore_rng=False) == {"step": 1}  # serving ignores the optimizer state
    with pytest.raises(CheckpointError, match="optimizer.pt does not match its sha256"):
        load(newest, TinyLM(), torch.optim.AdamW(model.parameters()))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_all_damaged_is_an_error_naming_each_and_deletes_nothing(tmp_path):
    ck = _save_steps(tmp_path, [1, 2])
    for p in ck.list():
        _flip_bit(p / "state.json")
    before = {p.name: _contents(p) for p in ck.list()}
    ck = Checkpointer(tmp_path / "ckpt")
    assert Checkpointer(tmp_path / "empty").latest_valid() is None  # no checkpoint at all: a fresh start
    with pytest.raises(CheckpointError, match=r"every one is damaged: step_000002 \(.*sha256.*\); step_000001"):
        ck.latest_valid()
    with pytest.raises(CheckpointError, match="every one is damaged"):
        resolve(tmp_path / "ckpt")
    assert {p.name: _contents(p) for p in ck.list()} == before


def test_pruning_and_resaving_never_delete_a_damaged_checkpoint(tmp_path):
    """Rotation, an abandoned later step and a step saved again set a damaged checkpoint aside instead."""
    folder = _save_steps(tmp_path, [1, 2, 3, 4]).ckpt_dir
    for step in (1, 3, 4):
        _flip_bit(folder / f"step_{step:06d}" / "model.safetensors")
    damaged = {step: _contents(folder / f"step_{step:06d}") for step in (1, 3, 4)}
    ck = Checkpointer(folder, keep_last=2)  # a new process, resuming
    assert ck.latest_valid() == folder / "step_000002"
    model, opt = _trained(seed=7)
    _save(ck, 3, model, opt, {"step": 3})
    assert [p.name for p in ck.list()] == ["step_000002", "step_000003"]
    for step, files in damaged.items():
        assert _contents(folder / f"step_{step:06d}.damaged") == files
    assert read_state(folder / "step_000003") == {"step": 3}
    _save(ck, 4, model, opt, {"step": 4})  # rotation as usual for the checkpoints that verify
    assert [p.name for p in ck.list()] == ["step_000003", "step_000004"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_000001.damaged", "step_000003", "step_000003.damaged", "step_000004", "step_000004.damaged"]


def test_leftover_tmp_folder_is_ignored_and_cleaned(tmp_path):
    ck = _save_steps(tmp_path, [1])
    stale = tmp_path / "ckpt" / ".tmp-step_000009-4242"
    stale.mkdir()
    (stale / "checksums.json").write_text("{}")
    assert ck.list() == [tmp_path / "ckpt" / "step_000001"]
    assert ck.latest_valid() == tmp_path / "ckpt" / "step_000001"
    model, opt = _trained()
    _save(ck, 2, model, opt, {})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001", "step_000002"]


def test_crash_mid_write_leaves_no_valid_looking_folder(tmp_path, monkeypatch):
    ck = _save_steps(tmp_path, [1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    model, opt = _trained()
    with pytest.raises(OSError, match="disk full"):
        _save(ck, 2, model, opt, {})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001"]
    assert ck.latest_valid() == tmp_path / "ckpt" / "step_000001"


def test_strict_load_names_keys_of_a_different_model(tmp_path):
    model, opt = _trained()
    path = Checkpointer(tmp_path, model, opt, {}).write(1)
    with pytest.raises(CheckpointError, match=r"different model config: shape mismatches: emb\.weight: "
                                              r"checkpoint \(16, 8\) vs model \(16, 12\)"):
        Checkpointer(tmp_path, TinyLM(d=12)).load(path)
    with pytest.raises(CheckpointError, match=r"missing keys: proj\.bias, proj\.weight"):
        Checkpointer(tmp_path, TinyLM(extra=True)).load(path)
    # An untied model may start from tied weights; a tied one cannot take two different matrices.
    untied = TinyLM(tie=False)
    Checkpointer(tmp_path, untied).load(path)
    assert torch.equal(untied.head.weight, model.emb.weight)
    untied_path = Checkpointer(tmp_path / "u", TinyLM(tie=False), None, {}).write(1)
    with pytest.raises(CheckpointError, match="tie_embeddings differs"):
        Checkpointer(tmp_path / "u", TinyLM()).load(untied_path)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        Checkpointer(tmp_path / "u", TinyLM(tie=False), torch.optim.AdamW(TinyLM().parameters())).load(untied_path)


def test_non_serializable_state_is_refused_before_writing(tmp_path):
    model, opt = _trained()
    with pytest.raises(TypeError, match="JSON-serializable"):
        Checkpointer(tmp_path, model, opt, {"bad": object()}).write(1)
    assert list(tmp_path.iterdir()) == []


def test_resolve_accepts_checkpoint_ckpt_dir_and_run_dir(tmp_path):
    run = tmp_path / "run"
    ck = Checkpointer(run / "train" / "ckpt")
    model, opt = _trained()
    _save(ck, 1, model, opt, {})
    newest = _save(ck, 2, model, opt, {})
    assert resolve(run) == newest
    assert resolve(run / "train" / "ckpt") == newest
    assert resolve(newest) == newest
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
        resolve(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope")


def test_checkpoint_files_get_the_umask_mode(tmp_path, umask):
    """Weights included: safetensors' own writer would leave model.safetensors at 0600 whatever the umask."""
    model, opt = _trained()
    path = Checkpointer(tmp_path / "ckpt", model, opt, {"step": 1}).write(1)
    modes = file_modes(path)
    assert set(modes) == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "checksums.json"}
    assert modes == dict.fromkeys(modes, umask)


def _tied_twice(order: list[str]) -> nn.Module:
    """Two tied pairs (a = a2, b = b2), registered in ``order``: equal weights, another state-dict order."""
    weights = {"a": nn.Parameter(torch.arange(6.0).reshape(2, 3)), "b": nn.Parameter(torch.linspace(-1, 1, 5))}
    model = nn.Module()
    for name in order:
        model.register_parameter(name, weights[name[0]])
    model.register_buffer("count", torch.tensor([3, 1], dtype=torch.int64))
    return model


def test_equal_weights_give_identical_weights_files(tmp_path):
    """The bytes depend on the tensors alone: not on insertion order, nor on the metadata's order."""
    files = []
    for i, order in enumerate((["a", "a2", "b", "b2"], ["b2", "b", "a2", "a"], ["a", "a2", "b", "b2"])):
        path = Checkpointer(tmp_path / str(i), _tied_twice(order), None, {"step": 1}).write(1)
        files.append((path / "model.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "i": torch.arange(4), "z": torch.tensor(2.0)}
    meta = {"format": "pt", "a": "1", "z": "2", "m": "3"}
    for i, (t, m) in enumerate(((tensors, meta), (dict(reversed(tensors.items())), dict(reversed(meta.items()))))):
        write_safetensors(t, tmp_path / f"{i}.safetensors", m)
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()
    back = load_file(tmp_path / "0.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    # The same format as safetensors' own writer, byte for byte, where its metadata order cannot vary.
    write_safetensors(tensors, tmp_path / "one.safetensors", {"format": "pt"})
    assert (tmp_path / "one.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


def test_sharded_layout_is_atomic_checksummed_and_resumes_like_the_single_file_one(tmp_path):
    """The DCP layout on one process: the same checkpointer seals, verifies, falls back and converts."""
    from lmforge.train.checkpoint_dcp import GatheredFile, Sharded

    model, opt = _trained()
    ck = Checkpointer(tmp_path / "ckpt", model, opt, {"step": 2}, layouts=(Sharded(), GatheredFile()))
    with warnings.catch_warnings():  # DCP notes that no process group is up: one process is meant here
        warnings.simplefilter("ignore")
        sharded = ck.write(2)
    assert sharded == tmp_path / "dcp" / "step_000002"
    assert set(json.loads((sharded / "checksums.json").read_text())) == {".metadata", "__0_0.distcp", "rng.pt",
                                                                           "state.json"}
    verify(sharded)
    assert ck.finish() == tmp_path / "ckpt" / "step_000002"  # the single file eval and serving read
    assert torch.equal(load_weights(tmp_path / "ckpt" / "step_000002")["emb.weight"], model.emb.weight.detach())
    shutil.rmtree(tmp_path / "ckpt")

    fresh, fresh_opt = _trained(seed=9)
    resumed = Checkpointer(tmp_path / "ckpt", fresh, fresh_opt, {}, layouts=(SingleFile(), Sharded()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resumed.load() == {"step": 2}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _flip_bit(sharded / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"step_000002 \(__0_0.distcp does not match its sha256"):
        resumed.load()
