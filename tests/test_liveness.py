"""A replica that is killed or frozen (SIGSTOP) mid-run ends the job on every other rank, with one
line naming it and a non-zero exit, instead of a wait without end: batch inference under one
torchrun and under two `--nnodes=2` torchruns on 127.0.0.1 (the multi-node and SLURM layout). The
peer deadline is PP_RUNTIME_PEER_TIMEOUT=3 s here (25 s by default).

The four runs start together (module fixture) with a driver thread each; every process they start is
killed at the end, also when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO
from dist_utils import alive, children, free_port, kill_all, wait_gone

DEADLINE_S = 3
HANG_S = 90  # far beyond the bound (deadline + 1 s + 2 s store timeout): only a hang gets here


@dataclass
class Scenario:
    name: str
    nodes: int  # torchruns (each one "node" of one process) or 1: one torchrun of two processes
    sig: int
    topology: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    workers: dict[int, int] = field(default_factory=dict)  # rank -> pid
    node_of: dict[int, int] = field(default_factory=dict)  # rank -> index of its torchrun
    victim: int = 1
    survivor_exited: bool = False
    survivor_log: str = ""
    launcher_codes: list = field(default_factory=list)
    failure: str = ""


SCENARIOS = [
    Scenario("one_torchrun_kill", 1, signal.SIGKILL, ["pipeline.data_parallel=2"]),
    Scenario("one_torchrun_stop", 1, signal.SIGSTOP, ["pipeline.data_parallel=2"]),
    Scenario("two_nodes_kill", 2, signal.SIGKILL, ["pipeline.data_parallel=2"]),
    Scenario("two_nodes_stop", 2, signal.SIGSTOP, ["pipeline.stages=2"]),  # rank 0 waits in a gloo receive
]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _launch(sc: Scenario, work: Path, ckpt: Path, prompts: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PP_RUNTIME_PEER_TIMEOUT=str(DEADLINE_S),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    args = [str(REPO / "launch" / "batch_infer.py"), f"model.path={ckpt}", f"input={prompts}",
            f"output={work / sc.name / 'out.jsonl'}", "device=cpu", "max_new_tokens=16", "progress=false",
            "inference.batch_size=1", "inference.max_batch_tokens=1", *sc.topology]
    port = free_port()
    if sc.nodes == 1:
        cmds = [["--standalone", "--nproc_per_node=2"]]
    else:
        cmds = [["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                 f"--rdzv_id={sc.name}"]] * 2
    for i, c in enumerate(cmds):
        if i == 1:  # the first torchrun holds the rendezvous store: it is "node 0"
            _wait_listening(port, sc.procs[0])
        log = work / f"{sc.name}.{i}.log"
        with open(log, "w") as f:
            sc.procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *c, *args], env=env,
                                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        sc.logs.append(log)


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    import socket

    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)


def _drive(sc: Scenario, work: Path) -> None:
    """Wait for generation, signal rank 1, see whether rank 0 ends; then end everything."""
    part = work / sc.name / "out.jsonl.part-0"
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and (not part.exists() or part.read_bytes().count(b"\n") < 2):
            if any(p.poll() is not None for p in sc.procs):
                sc.failure = "a launcher ended before generation started"
                return
            time.sleep(0.1)
        for i, p in enumerate(sc.procs):
            for w in children(p.pid):
                rank = _rank_of(w)
                if rank is not None:
                    sc.workers[rank] = w
                    sc.node_of[rank] = i
        if sorted(sc.workers) != [0, 1] or not part.exists():
            sc.failure = f"generation did not start (workers {sc.workers})"
            return
        # the victim: rank 1 of one torchrun; of two, the rank on the node without the store (the other
        # case, the store's node lost, ends the survivor through its own torchrun)
        sc.victim = 1 if sc.nodes == 1 else next(r for r, n in sc.node_of.items() if n == 1)
        survivor = 1 - sc.victim
        os.kill(sc.workers[sc.victim], sc.sig)
        sc.survivor_exited = wait_gone([sc.workers[survivor]], HANG_S) == []
        kill_all([sc.workers[sc.victim]])  # a frozen one cannot exit by itself
        for p in sc.procs:
            try:
                sc.launcher_codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                sc.launcher_codes.append(None)
    finally:
        for p in sc.procs:
            kill_all(children(p.pid))
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        kill_all(list(sc.workers.values()))
        logs = [log.read_text() for log in sc.logs]
        sc.survivor_log = logs[0]  # one torchrun, or the one holding the store (the survivor)


@pytest.fixture(scope="module")
def scenarios(tiny_ckpt, tmp_path_factory) -> dict[str, Scenario]:
    work = tmp_path_factory.mktemp("liveness")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "the cat sat on a mat " * (1 + i % 3)}) + "\n"
                               for i in range(400)))
    runs = [Scenario(s.name, s.nodes, s.sig, s.topology) for s in SCENARIOS]
    threads = []
    try:
        for sc in runs:
            (work / sc.name).mkdir()
            _launch(sc, work, tiny_ckpt, prompts)
            threads.append(threading.Thread(target=_drive, args=(sc, work)))
            threads[-1].start()
    finally:
        for t in threads:
            t.join()
        for sc in runs:  # whatever happened above, nothing of ours stays behind
            for p in sc.procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            kill_all([w for w in sc.workers.values() if alive(w)])
    return {sc.name: sc for sc in runs}


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_lost_rank_ends_every_other_rank(name, scenarios):
    sc = scenarios[name]
    log = sc.survivor_log
    assert not sc.failure, sc.failure + "\n" + log[-3000:]
    survivor = 1 - sc.victim
    assert sc.survivor_exited, f"rank {survivor} still ran {HANG_S}s after rank {sc.victim} got {signal.Signals(sc.sig).name}"
    assert all(c not in (0, None) for c in sc.launcher_codes), (sc.launcher_codes, log[-3000:])
    assert "Connection closed by peer" not in log and "Connection reset by peer" not in log
    if name == "one_torchrun_kill":
        return  # torchrun itself may end the survivor first (SIGTERM), before its watchdog speaks
    lines = [ln for ln in log.splitlines() if ln.startswith(f"[rank {survivor}] error:")]
    assert len(lines) == 1, log[-3000:]
    assert f"rank {sc.victim} stopped responding" in lines[0], lines[0]
    assert "exitcode  : 3" in log or "exitcode: 3" in log, log[-3000:]
