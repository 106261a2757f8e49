"""The collect, clean and pack stages on a real Slurm cluster: munged, slurmctld and slurmd started here on 127.0.0.1.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them); without them the test fails
and says so, rather than being skipped.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.data.sources import DataError
from tests.data.test_data_tasks import _card, _clean, _kept, _with
from tests.data.test_data_tasks import collected as collected  # the fixture, shared

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(d: Path, munge_socket: Path) -> str:
    host, user = socket.gethostname().split(".")[0], getpass.getuser()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    return f"""ClusterName=lmforgetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 10
    while not pid_file.is_file() or not pid_file.read_text().strip():  # a daemon writes it just after forking
        assert time.monotonic() < deadline, f"no {pid_file}"
        time.sleep(0.05)
    return int(pid_file.read_text().split()[0])


def _stop(pids: list[int]) -> None:
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.fail(f"Slurm test needs {', '.join(missing)}: install Debian's slurm-wlm and munge "
                    "(apt-get install -y slurm-wlm munge; .ci/run does)")
    d = tmp_path / "cluster"
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True)
    key, sock = d / "munge" / "munge.key", d / "munge" / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munged = shutil.which("munged") or "/usr/sbin/munged"
    subprocess.run([munged, "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d}/munged.pid",
                    f"--log-file={d}/munged.log", f"--seed-file={d}/munge/seed"], check=True)
    pids = [_pid(d / "munged.pid")]  # read now: what the test writes may not touch how the daemons are stopped
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, sock))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([shutil.which(daemon) or f"/usr/sbin/{daemon}", "-f", str(conf)], check=True)
            pids.append(_pid(d / f"{daemon}.pid"))
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (d / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)  # polls the daemons' state, not a guess at timing
        yield d
    finally:
        _stop(pids)


def test_slurm_runs_clean_and_pack_and_writes_what_local_writes(cluster: Path, collected: tuple, tmp_path: Path) -> None:
    cfg, up = collected
    local = _clean(_with(cfg, tasks=4, workers=2), up, tmp_path / "local")
    slurm_cfg = _with(cfg, tasks=4, workers=2, executor="slurm",
                      slurm=cfg.data.slurm.model_copy(update={"partition": "debug", "time": "00:10:00",
                                                              "mem_per_cpu_gb": 1, "poll_seconds": 0.5}))
    on_slurm = _clean(slurm_cfg, up, tmp_path / "slurm")
    assert on_slurm["executor"] == "slurm"
    assert _kept(tmp_path / "slurm") == _kept(tmp_path / "local")
    assert _card(tmp_path / "slurm") == _card(tmp_path / "local")
    assert on_slurm["documents"] == local["documents"] and local["documents"]["kept"] > 0
    # The pack stage's encoding tasks on Slurm write the same shards as one local process.
    from lmforge.data import pack
    from lmforge.pipeline import run

    run(cfg, until="tokenizer")
    args = (cfg.run_dir / "docs", cfg.run_dir / "tokenizer")
    packed = pack.main(_with(slurm_cfg, tasks=3), *args, tmp_path / "pack_slurm", 4096)
    assert packed == pack.main(cfg, *args, tmp_path / "pack_local", 4096) and packed["train"]["shards"] > 1
    for name in [p.name for p in pack.list_shards(tmp_path / "pack_local", "train")]:
        assert (tmp_path / "pack_slurm" / name).read_bytes() == (tmp_path / "pack_local" / name).read_bytes()


def test_slurm_runs_collect_and_writes_what_local_writes(cluster: Path, tmp_path: Path) -> None:
    from lmforge.data import collect
    from tests.data.test_data_collect_tasks import _cfg, _corpus, _counts, _shards

    corpus = (tmp_path, _corpus(tmp_path))
    local = collect.main(_cfg(corpus, "local", tasks=1), tmp_path / "local")
    slurm = _cfg(corpus, "slurm", tasks=4, workers=2, executor="slurm",
                 slurm={"partition": "debug", "time": "00:10:00", "mem_per_cpu_gb": 1, "poll_seconds": 0.5})
    on_slurm = collect.main(slurm, tmp_path / "slurm")
    assert _counts(on_slurm) == _counts(local) and local["shards"] > 5
    assert _shards(tmp_path / "slurm") == _shards(tmp_path / "local")
    assert (tmp_path / "slurm" / "rejects.jsonl").read_bytes() == (tmp_path / "local" / "rejects.jsonl").read_bytes()
    assert not (tmp_path / "slurm" / "work").exists()


def test_a_job_the_cluster_refuses_is_one_clear_error(cluster: Path, collected: tuple, tmp_path: Path) -> None:
    cfg, up = collected
    bad = _with(cfg, executor="slurm", tasks=2,
                slurm=cfg.data.slurm.model_copy(update={"partition": "nosuchpartition"}))
    with pytest.raises(DataError, match=r"Slurm refused .*nosuchpartition"):
        _clean(bad, up, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "data_card.json").exists()
