"""Scale-out on CPU: DDP and FSDP2 through torchrun with the gloo backend and 2 processes.

Each 2-rank launch is a real ``python -m torch.distributed.run --nproc_per_node=2 -m lmforge train``
on a tiny Transformer for 6 steps, on data prepared once for the module; the runs are compared with
one process training on the same global batch (run in this process: an interpreter start costs more
than the 6 steps). Run alone: ``.venv/bin/pytest -q tests/train/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main as cli_main
from lmforge.config import ConfigError, TrainConfig, load_config
from lmforge.data.loader import TokenLoader
from lmforge.models import build_model
from lmforge.runtime import Runtime
from lmforge.train.checkpoint import verify
from lmforge.train.distributed import Parallel, plan_batches
from lmforge.train.metrics import gpu_peak_flops
from tests.conftest import ROOT, TINY
from tests.in_process import call_cli

STEPS = 6
LAST = f"step_{STEPS:06d}"


def _common(runs: Path, corpus: Path) -> list[str]:
    # A global batch of 2 x 4 = 8 sequences: one process runs 4 micro-batches of 2, each of 2 ranks 2 of 2
    # (so DDP's no_sync and FSDP's deferred reduce-scatter are used). One thread per process: 2 ranks on 2
    # cores. ckpt_every=3 leaves a mid-run checkpoint to resume from.
    return ["--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{corpus}]", f"--train.steps={STEPS}",
            "--train.batch_size=2", "--train.grad_accum=4", "--train.log_every=1", "--train.eval_every=0",
            "--train.ckpt_every=3", "--train.threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``lmforge ARGS`` on ``nproc`` local ranks, launched by torchrun as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "lmforge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_corpus: Path) -> tuple[Path, list[str]]:
    """Tokenizer and shards prepared once (run 'base'); each test trains a copy of it."""
    runs = tmp_path_factory.mktemp("runs")
    common = _common(runs, small_corpus)
    cli_main(["pack", *common, "--name=base"])
    return runs, common


def _copy(runs: Path, src: str, name: str) -> None:
    shutil.copytree(runs / src, runs / name)


def _train(prepared: tuple[Path, list[str]], name: str, nproc: int, *extra: str, src: str = "base") -> Path:
    runs, common = prepared
    if not (runs / name).exists():
        _copy(runs, src, name)
    if nproc == 1:
        assert call_cli("train", *common, f"--name={name}", *extra) == 0
    else:
        out = _torchrun(nproc, "train", *common, f"--name={name}", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
    return runs / name


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _weights(run: Path, step: str = LAST) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "ckpt" / step / "model.safetensors"))


def _assert_same_run(run: Path, reference: Path, steps: range = range(1, STEPS + 1)) -> None:
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5), s
    a, b = _weights(run), _weights(reference)
    assert sorted(a) == sorted(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(prepared) -> Path:
    return _train(prepared, "single", 1)


@pytest.fixture(scope="module")
def ddp(prepared) -> Path:
    return _train(prepared, "ddp", 2)


# ------------------------------------------------------------------ data parallel
def test_ddp_matches_one_process(single: Path, ddp: Path) -> None:
    _assert_same_run(ddp, single)  # 2 ranks x 4 sequences == 1 process x 8 sequences, step for step
    state = json.loads((ddp / "train" / "ckpt" / LAST / "state.json").read_text())
    assert state["tokens_seen"] == STEPS * 8 * 32  # the global batch: train.batch_size x context per step
    assert state["loader"]["cursor"] == json.loads((single / "train" / "ckpt" / LAST / "state.json").read_text())[
        "loader"]["cursor"]


def test_only_rank0_writes_files(single: Path, ddp: Path) -> None:
    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}

    assert files(ddp) == files(single)  # the same artifacts, no per-rank copies, no temporary debris
    assert not [f for f in files(ddp) if ".tmp" in f or "rank" in f]
    assert (ddp / "train" / "manifest.json").is_file()


def test_ddp_checkpoint_resumes_on_one_and_two_processes(prepared, ddp: Path) -> None:
    runs, _ = prepared
    for nproc in (1, 2):
        name = f"resume{nproc}"
        _copy(runs, "ddp", name)
        shutil.rmtree(runs / name / "train" / "ckpt" / LAST)  # as if the DDP run had stopped after step 3
        (runs / name / "train" / "manifest.json").unlink()
        _train(prepared, name, nproc)
        _assert_same_run(runs / name, ddp, steps=range(4, STEPS + 1))


# ------------------------------------------------------------------ FSDP2
def test_fsdp_matches_one_process_and_resumes_from_shards(prepared, single: Path) -> None:
    runs, _ = prepared
    fsdp = _train(prepared, "fsdp", 2, "--train.parallel=fsdp")
    _assert_same_run(fsdp, single)  # compares the single-file checkpoint converted at the end
    for step in ("step_000003", LAST):
        shards = sorted(p.name for p in (fsdp / "train" / "dcp" / step).iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "checksums.json", "rng.pt", "state.json"]
        verify(fsdp / "train" / "dcp" / step)  # sharded checkpoints are checksummed like single-file ones
    assert [p.name for p in (fsdp / "train" / "ckpt").iterdir()] == [LAST]

    # The sharded checkpoint of step 3 resumes on one process, without a process group.
    _copy(runs, "fsdp", "fsdp1")
    shutil.rmtree(runs / "fsdp1" / "train" / "ckpt")
    shutil.rmtree(runs / "fsdp1" / "train" / "dcp" / LAST)
    (runs / "fsdp1" / "train" / "manifest.json").unlink()
    _train(prepared, "fsdp1", 1)
    _assert_same_run(runs / "fsdp1", single, steps=range(4, STEPS + 1))


# ------------------------------------------------------------------ bad input
def test_world_size_must_divide_the_global_batch() -> None:
    with pytest.raises(ConfigError, match=r"2 ranks do not divide the global batch of 3 sequences "
                                          r"\(train.batch_size 3 x train.grad_accum 1\)"):
        plan_batches(TrainConfig(batch_size=3), 2)
    with pytest.raises(ConfigError, match=r"train.micro_batch=5 does not divide the 8 sequences"):
        plan_batches(TrainConfig(batch_size=8, grad_accum=2, micro_batch=5), 2)
    plan = plan_batches(TrainConfig(batch_size=8, grad_accum=1), 2)
    assert (plan.global_batch, plan.micro_batch, plan.accum) == (8, 4, 1)
    plan = plan_batches(TrainConfig(batch_size=16, grad_accum=4), 2)
    assert (plan.micro_batch, plan.accum) == (16, 2)  # the memory of one micro-batch stays what it was
    plan = plan_batches(TrainConfig(batch_size=16, grad_accum=3), 2)
    assert (plan.micro_batch, plan.accum) == (12, 2)  # 24 per rank: the largest divisor not above 16
    plan = plan_batches(TrainConfig(batch_size=16, grad_accum=3), 1)
    assert (plan.micro_batch, plan.accum) == (16, 3)  # one process: exactly as configured


def test_indivisible_batch_fails_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import lmforge.runtime

    monkeypatch.setattr(lmforge.runtime, "join", lambda cfg: (0, 2))  # as rank 0 of 2 under torchrun
    from lmforge.pipeline import run

    with pytest.raises(ConfigError, match="2 ranks do not divide the global batch of 3 sequences"):
        run(load_config(TINY, [f"runs_dir={tmp_path}", "train.batch_size=3"]), until="train")
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "could not reach the rendezvous at 127.0.0.1"),
])
def test_missing_rendezvous_is_one_clear_line(tmp_path: Path, monkeypatch, capsys, env: dict, expected: str) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "MASTER_ADDR" in env:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody listens there
    assert call_cli("train", "--config", str(TINY), f"--runs_dir={tmp_path}", "--train.dist_timeout=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "tiny").exists()  # refused before any work


def test_checkpoint_of_another_model_config_is_refused(prepared, ddp: Path, capsys) -> None:
    runs, common = prepared
    _copy(runs, "ddp", "other")
    assert call_cli("train", *common, "--name=other", "--model.d_model=48", f"--train.steps={STEPS + 2}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "was trained with another model/train config" in err[-1]


# ------------------------------------------------------------------ in-process pieces
def test_loader_stream_does_not_depend_on_the_number_of_ranks(prepared) -> None:
    runs, _ = prepared
    pack = runs / "base" / "pack"
    one = TokenLoader(pack, "train", 8, 32, seed=3)
    two = [TokenLoader(pack, "train", 4, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    steps = one.n_windows // 8 + 2  # runs past the end of the first epoch
    for _ in range(steps):
        x, _ = one.next_batch()
        x0, x1 = (r.next_batch()[0] for r in two)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert two[0].state_dict() == two[1].state_dict() == one.state_dict()
    # A state saved on 2 ranks resumes on 1, and the other way round.
    again = TokenLoader(pack, "train", 8, 32, seed=3)
    again.load_state_dict(two[0].state_dict())
    x = again.next_batch()[0]
    halves = [TokenLoader(pack, "train", 4, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in halves:
        r.load_state_dict(one.state_dict())
    assert torch.equal(x, one.next_batch()[0])
    assert torch.equal(x[0::2], halves[0].next_batch()[0]) and torch.equal(x[1::2], halves[1].next_batch()[0])


def test_compile_and_bf16_autocast_paths_run_on_cpu(monkeypatch) -> None:
    # The compile path is exercised through TorchDynamo's graph capture with the aot_eager backend: it traces
    # forward and backward as inductor would but skips C++ code generation (about 40 s cold on 2 cores).
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="aot_eager", **kw))
    cfg = load_config(TINY, ["model.vocab_size=64", "model.n_layers=1", "train.compile=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.bfloat16)
    par = Parallel(cfg.train, rt)
    fwd = par.wrap(model)
    assert par.compile and fwd is not model and getattr(fwd, "_orig_mod", None) is model
    x = torch.randint(0, 64, (2, 16))
    with rt.autocast():
        logits, loss = fwd(x, x)
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        _, eager = model(x, x)  # fp32, not compiled
    assert float(loss.detach()) == pytest.approx(float(eager), rel=2e-2)
    # Defaults: compile is on for CUDA only (it measured no gain on this CPU).
    assert not Parallel(TrainConfig(), Runtime(torch.device("cpu"), torch.float32)).compile
    assert Parallel(TrainConfig(), Runtime(torch.device("cuda"), torch.bfloat16)).compile


# ------------------------------------------------------------------ GPU recipes and benchmark
@pytest.mark.parametrize("recipe, params, parallel", [("gpu-124m", 123.6e6, "ddp"), ("gpu-1b-fsdp", 1.11e9, "fsdp")])
def test_gpu_recipes_validate(recipe: str, params: float, parallel: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", [])
    assert cfg.train.dtype == "bfloat16" and cfg.train.compile and cfg.train.parallel == parallel
    assert cfg.train.batch_size * cfg.train.grad_accum * cfg.model.context == 524_288  # 0.5M tokens per step
    for ranks in (1, 8, 32):
        plan_batches(cfg.train, ranks)  # splits evenly on 1 GPU, a node of 8 and 4 nodes
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    with torch.device("meta"):  # sizes without allocating the weights
        model = build_model(cfg.model)
    assert model.num_params() == pytest.approx(params, rel=0.01)


def test_gpu_peaks_by_name() -> None:
    assert gpu_peak_flops("NVIDIA H200 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA GH200 480GB") == 989e12
    assert gpu_peak_flops("NVIDIA H20") == 148e12
    assert gpu_peak_flops("NVIDIA A800-SXM4-80GB") == 312e12
    assert gpu_peak_flops("AMD Instinct MI300X") == 1307e12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_benchmark_refuses_without_a_gpu(capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_throughput.main([]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
