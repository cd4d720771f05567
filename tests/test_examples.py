"""The runnable examples stay runnable."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from dist_utils import free_port

EXAMPLES = REPO / "torchrun_examples"


def _run(args: list[str], cwd) -> str:
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_partition_example(tmp_path):
    out = _run([str(EXAMPLES / "partition_model.py"), "4"], tmp_path)
    assert "mixtral-8x7b, training" in out and "stage 3 (rank 3)" in out


def test_schedule_example_draws_a_png(tmp_path):
    out = _run([str(EXAMPLES / "simulate_schedule.py")], tmp_path)
    assert "1f1b         bubble 0.273" in out  # (4-1)/(8+4-1)
    assert (tmp_path / "timeline_1f1b.png").read_bytes()[:4] == b"\x89PNG"


def test_pipelined_generate_example(tmp_path):
    out = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(EXAMPLES / "pipelined_generate.py")], tmp_path)
    assert out.count("prompt tokens ->") == 10 and "busy: stage 0" in out
