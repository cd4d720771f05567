"""The project's own SLURM scripts against a real SLURM on this machine.

Installs Debian's slurmctld/slurmd/slurm-client/munge when the binaries are missing, reuses a
working cluster when one answers, and otherwise starts a private one-node cluster (its own munged
socket and key, its own ports, state and spool in a temporary folder) and stops exactly what it
started. It never skips: if SLURM cannot run here, the test fails and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "munge")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
                                      None)


def _install() -> None:
    if all(_which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"could not install {' '.join(PACKAGES)} with apt-get:\n{r.stderr[-2000:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        pytest.fail(f"SLURM binaries still missing after apt-get install: {missing}")


def _slurm(env: dict, *args: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([_which(args[0]) or args[0], *args[1:]], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _cluster_works(env: dict) -> bool:
    try:
        ping = _slurm(env, "scontrol", "ping", timeout=10)
        states = _slurm(env, "sinfo", "-h", "-o", "%t", timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return False
    ok_states = {"idle", "mix", "alloc", "comp"}
    return ping.returncode == 0 and "UP" in ping.stdout and any(
        s.strip().rstrip("*~#") in ok_states for s in states.stdout.split())


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF = """\
ClusterName=pptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=3
MinJobAge=4
# (sbatch --wait polls every 2 s only while 2 s < MinJobAge/2 fails; a larger MinJobAge makes it sleep up to 32 s)
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class _PrivateCluster:
    """munged + slurmctld + slurmd of our own; stop() ends only these processes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ppslurm-", dir="/tmp"))
        self.dir.chmod(0o755)  # munged wants its socket folder searchable by all, writable by the owner only
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, slurmd_port = _free_ports(2)
        conf = d / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=ctld_port, slurmd_port=slurmd_port, d=d))
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def start(self) -> None:
        d = self.dir
        r = subprocess.run([_which("munged"), f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                            f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                            f"--seed-file={d}/munged.seed"], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"munged did not start: {r.stderr.strip()} {self._log('munged.log')}")
        self.munged_pid = int((d / "munged.pid").read_text())
        conf = self.env["SLURM_CONF"]
        for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", [])):
            log = open(d / f"{daemon}.out", "w")
            self.procs.append(subprocess.Popen([_which(daemon), "-D", "-f", conf, *extra], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 40
        while not _cluster_works(self.env):
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError("SLURM did not come up: " + self._log("slurmctld.out") + self._log("slurmd.out"))
            time.sleep(0.3)

    def _log(self, name: str) -> str:
        p = self.dir / name
        return f"\n--- {name}:\n" + ("\n".join(p.read_text(errors="replace").splitlines()[-15:]) if p.exists() else "")

    def stop(self) -> None:
        if self.procs:
            subprocess.run([_which("scancel") or "scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=20)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # it writes its seed file on the way out
                    os.kill(self.munged_pid, 0)
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_env():
    _install()
    if _cluster_works(dict(os.environ)):
        yield dict(os.environ)  # someone else's working cluster: use it, leave it running
        return
    cluster = _PrivateCluster()
    try:
        cluster.start()
        yield cluster.env
    finally:
        cluster.stop()


def _job_state(env: dict, job: str) -> str:
    r = _slurm(env, "scontrol", "show", "job", job)
    for tok in r.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "GONE"


def _submit(env: dict, workdir: Path, script: str, args: list[str], wait: bool, timeout: float = 120) -> str:
    t0 = time.monotonic()
    cmd = ["sbatch", "--parsable", "--chdir", str(workdir), "--output", str(workdir / "slurm-%j.out"),
           *(["--wait"] if wait else []), str(REPO / "launch" / "slurm" / script), *args]
    r = _slurm(env, *cmd, timeout=timeout)
    job = r.stdout.strip().split(";")[0].splitlines()[0] if r.stdout.strip() else "?"
    if r.returncode != 0:
        log = workdir / f"slurm-{job}.out"
        raise AssertionError(f"sbatch {script} failed ({r.returncode}): {r.stderr.strip()}\n"
                             + (log.read_text()[-3000:] if log.exists() else ""))
    print(f"sbatch {script} -> job {job}{' (waited %.1fs)' % (time.monotonic() - t0) if wait else ''}")
    return job


def _ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_batch_infer_sbatch_runs_resumes_after_scancel(slurm_env, tiny_ckpt, tmp_path):
    n = 100
    words = "the cat sat on a mat while two dogs ran past seven red boxes".split()
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": " ".join(words[: 1 + (i * 7) % 13])}) + "\n"
                           for i in range(n)))
    env = {**slurm_env, "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    common = [f"model.path={tiny_ckpt}", f"input={inp}", "max_new_tokens=5", "device=cpu", "progress_interval=1"]

    # 1. a whole run, 2 ranks (a 2-stage pipeline), sbatch --wait
    first = tmp_path / "first.jsonl"
    job = _submit(env, tmp_path, "batch_infer.sbatch", common + [f"output={first}"], wait=True)
    assert _ids(first) == [f"p{i}" for i in range(n)]
    assert json.loads((tmp_path / "first.jsonl.summary.json").read_text())["requests"] == n
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "progress: " in log and "batch done" in log

    # 2. a slow run (one sequence at a time), cancelled once some lines are on disk
    second = tmp_path / "second.jsonl"
    job = _submit(env, tmp_path, "batch_infer.sbatch",
                  common + [f"output={second}", "inference.batch_size=1", "inference.microbatches=1"], wait=False)
    part = tmp_path / "second.jsonl.part-0"
    t_submit = time.monotonic()
    deadline = time.monotonic() + 60
    while not (part.exists() and part.read_bytes().count(b"\n") >= 5):
        state = _job_state(env, job)
        assert state in ACTIVE, f"job {job} ended ({state}) before it could be cancelled"
        assert time.monotonic() < deadline, "no results appeared within 60 s"
        time.sleep(0.1)
    print(f"scancel {job} after {time.monotonic() - t_submit:.1f}s")
    _slurm(env, "scancel", job, check=True)
    while _job_state(env, job) in ACTIVE:
        time.sleep(0.2)
    assert _job_state(env, job) in ("CANCELLED", "GONE")
    done_before = part.read_bytes().count(b"\n")
    assert 5 <= done_before < n and not second.exists()

    # 3. resubmitted with the same output: finishes the rest, nothing twice, same results
    job = _submit(env, tmp_path, "batch_infer.sbatch", common + [f"output={second}"], wait=True)
    assert _ids(second) == [f"p{i}" for i in range(n)]
    a = [json.loads(x) for x in first.read_text().splitlines()]
    b = [json.loads(x) for x in second.read_text().splitlines()]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    summary = json.loads((tmp_path / "second.jsonl.summary.json").read_text())
    assert summary["skipped_already_done"] >= done_before - 1 and summary["complete"]
    assert "already done" in (tmp_path / f"slurm-{job}.out").read_text()


def test_finetune_sbatch_builds_the_multinode_command(slurm_env, tmp_path):
    """DRY_RUN prints the srun + torchrun line inside a real allocation: rendezvous on the first node,
    node count from SLURM, a fixed checkpoint folder appended unless given."""
    env = {**slurm_env, "GPUS_PER_NODE": "2", "DRY_RUN": "1"}
    job = _submit(env, tmp_path, "finetune.sbatch", ["train.lr=1e-4"], wait=True)
    line = (tmp_path / f"slurm-{job}.out").read_text().strip().splitlines()[-1]
    assert line.startswith("srun ") and "--ntasks-per-node=1" in line
    assert "--nnodes=1 --nproc_per_node=2" in line and "--rdzv_backend=c10d" in line
    assert f"--rdzv_id={job}" in line and "--rdzv_endpoint=" in line
    assert f"{REPO}/launch/finetune.py train.lr=1e-4 checkpoint.dir={tmp_path}/checkpoints/pp-finetune" in line, line
    job = _submit({**env, "CHECKPOINT_DIR": "/ignored"}, tmp_path, "finetune.sbatch",
                  ["checkpoint.dir=/given"], wait=True)
    line = (tmp_path / f"slurm-{job}.out").read_text().strip().splitlines()[-1]
    assert line.endswith("finetune.py checkpoint.dir=/given")
