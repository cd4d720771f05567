"""`launch/finetune.py` under torchrun: bad input stops every rank with one clear line and a non-zero
exit (never a hang), and two torchrun "nodes" on this machine train like one process.

All runs start together (module fixture) and each test waits for its own: the machine is small
and most of a torchrun's time is start-up.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from pp_runtime.model.args import preset
from pp_runtime.training import checkpoint as tc
from ckpt_helpers import random_state_dict
from pp_runtime.jobs.config import load_config
from pp_runtime.model.partition import plan_for

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """A subprocess started in its own session, so a timeout can end it and its workers."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str) -> None:
        self.cmd, self.name = cmd, name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True)
        self._rc: Optional[int] = None

    def result(self) -> tuple[int, str, str]:
        if self._rc is None:
            try:
                self._rc = self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"{self.name} hung for {TIMEOUT}s: {' '.join(self.cmd)}\n{self.err_path.read_text()[-3000:]}")
        return self._rc, self.out_path.read_text(), self.err_path.read_text()


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(REPO / "launch" / "finetune.py")]


def two_procs() -> list[str]:
    return torchrun("--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}")


def base_args(data: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["model=random", f"data.path={data}", f"data.tokenizer={tokenizer}", "data.seq_len=24", f"out_dir={out}",
            "train.steps=2", "train.batch_size=4", "schedule.microbatches=2", "device=cpu", "model.dtype=float32",
            *extra]


def write_data(path: Path, n: int = 24) -> Path:
    from conftest import _WORDS

    rng = random.Random(1)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
            f.write(json.dumps({"text": words} if i % 2 else {"prompt": words, "completion": "seven red boxes"}) + "\n")
    return path


def other_model_checkpoint(root: Path) -> Path:
    """A training checkpoint of a model with another width (written directly, no training)."""
    args = preset("tiny", dim=32, hidden_dim=64)
    plan = plan_for(args, 1, training=True)
    return tc.save_train_checkpoint(root, step=1, shards={0: (random_state_dict(args), {})}, stages=plan.stages, args=args)


BAD = {
    # name: (extra overrides, data file kind, message on every rank)
    "too_few_microbatches": (["schedule=1f1b", "schedule.microbatches=1", "train.batch_size=2"], "good",
                             r"1F1B needs at least as many micro-batches as stages \(got 1 for 2 stages\)"),
    "batch_not_divisible": (["train.batch_size=5"], "good",
                            r"train\.batch_size=5 does not divide into 1 data-parallel replica\(s\) x 2 micro-batches"),
    "empty_data": ([], "empty", r"data file .*empty\.jsonl is empty"),
    "malformed_data": ([], "malformed", r"bad\.jsonl line 3: not valid JSON"),
    "resume_other_model": (["resume=OTHER"], "good",
                           r"was saved for a different model \(dim: checkpoint 32 vs config 64; hidden_dim: checkpoint 64 vs config 128"),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_ckpt) -> dict[str, Launched]:
    work = tmp_path_factory.mktemp("finetune_cli")
    files = {"good": write_data(work / "good.jsonl"), "empty": work / "empty.jsonl", "malformed": work / "bad.jsonl"}
    files["empty"].write_text("\n  \n")
    lines = files["good"].read_text().splitlines()
    files["malformed"].write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]) + "\n")
    other = other_model_checkpoint(work / "other_ckpt")
    runs: dict[str, Launched] = {}
    for name, (extra, kind, _) in BAD.items():
        extra = [e.replace("OTHER", str(other)) for e in extra]
        runs[name] = Launched(two_procs() + base_args(files[kind], tiny_ckpt, work / name, *extra), work, name)
    # two "nodes" of one process each, meeting through a c10d rendezvous on 127.0.0.1, running the
    # zero-bubble schedule from its config group (the one-process reference runs plain 1F1B)
    port = free_port()
    for node in (0, 1):
        cmd = torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes")
        args = base_args(files["good"], tiny_ckpt, work / "two_nodes", "schedule=zb_h1")
        runs[f"node{node}"] = Launched(cmd + args, work, f"node{node}")
    runs["_work"] = work  # type: ignore[assignment]
    runs["_good"] = files["good"]  # type: ignore[assignment]
    return runs


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_fails_cleanly_on_every_rank(launched, name):
    rc, out, err = launched[name].result()
    assert rc != 0, f"{name} exited 0:\n{out}\n{err}"
    pattern = BAD[name][2]
    for rank in (0, 1):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"[rank {rank}] error: ")]
        assert len(lines) == 1, f"rank {rank} printed {len(lines)} error lines for {name}:\n{err[-3000:]}"
        assert re.search(pattern, lines[0]), f"rank {rank}: {lines[0]!r} does not match {pattern!r}"
    assert "step 1/" not in out  # nothing trained


def _losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.mark.timeout(TIMEOUT + 60)
def test_two_nodes_train_like_one_process(launched, tiny_ckpt, tmp_path):
    results = [launched[f"node{i}"].result() for i in (0, 1)]
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"node {i} failed:\n{out}\n{err[-3000:]}"
    assert "schedule zb-h1 with 2 micro-batches" in results[0][1]
    two_nodes = _losses(launched["_work"] / "two_nodes" / "metrics.jsonl")
    from pp_runtime.jobs.finetune import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(load_config("finetune", base_args(launched["_good"], tiny_ckpt, tmp_path))) == 0
    finally:
        torch.set_num_threads(before)
    one = _losses(tmp_path / "metrics.jsonl")
    assert len(two_nodes) == len(one) == 2
    assert two_nodes == pytest.approx(one, rel=1e-5)
