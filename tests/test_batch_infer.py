"""Resumable batch inference (launch/batch_infer.py): data-parallel pipelines, kill -9 and restart,
bad input lines, strict mode. CPU, gloo, the tiny checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import children, kill_all, wait_gone
from pp_runtime.errors import ConfigError, InputError
from pp_runtime.jobs.batch_files import LineSet, merge_results, repair_jsonl

REPO = Path(__file__).resolve().parents[1]
N_PROMPTS = 240
MAX_NEW = 6
WORDS = "the cat sat on a mat while two dogs ran past seven red boxes and one blue kite".split()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "launch" / "batch_infer.py"), *args]


def run_inprocess(args: list[str]) -> int:
    """One-process run inside pytest (no interpreter start-up)."""
    from pp_runtime.jobs.batch import run
    from pp_runtime.jobs.config import load_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(load_config("batch_infer", args))
    finally:
        torch.set_num_threads(threads)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        for key in ("line", "prompt", "completion", "tokens", "finish_reason", "prompt_tokens", "generated_tokens"):
            assert g[key] == w[key], (g["id"], key)
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-3)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """Short prompts of mixed lengths (some longer than the window of 16), both line formats, some
    per-line settings and some sampled lines, and a blank line."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("batch_in") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_PROMPTS):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 5, 8, 12, 30])))
            if i % 7 == 3:
                line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": text, "max_tokens": 3}}
            elif i % 11 == 5:
                line = {"custom_id": f"req-{i}", "body": {"messages": [{"role": "user", "content": text}]}}
            elif i % 13 == 6:
                line = {"id": f"r{i}", "prompt": text, "temperature": 0.8, "top_p": 0.9}
            else:
                line = {"id": f"r{i}", "prompt": text}
            f.write(json.dumps(line) + "\n")
            if i == 50:
                f.write("\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_ckpt, prompts_file, tmp_path_factory) -> list[dict]:
    """One process, uninterrupted."""
    out = tmp_path_factory.mktemp("batch_ref") / "ref.jsonl"
    assert run_inprocess([f"model.path={tiny_ckpt}", f"input={prompts_file}", f"output={out}",
                          f"max_new_tokens={MAX_NEW}", "device=cpu", "progress=false"]) == 0
    recs = read_jsonl(out)
    assert len(recs) == N_PROMPTS and [r["line"] for r in recs] == sorted(r["line"] for r in recs)
    assert {r["finish_reason"] for r in recs} <= {"stop", "length"}
    assert json.loads(out.with_name("ref.jsonl.summary.json").read_text())["requests"] == N_PROMPTS
    return recs


def test_two_replicas_of_two_stages_match_one_process(tiny_ckpt, prompts_file, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        torchrun_cmd(4, [f"model.path={tiny_ckpt}", f"input={prompts_file}", f"output={out}",
                         f"max_new_tokens={MAX_NEW}", "device=cpu", "pipeline.data_parallel=2",
                         "progress_interval=0.2"]),
        env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(read_jsonl(out), reference)
    assert "progress: " in proc.stderr  # not a terminal: plain periodic lines
    assert "batch done: 240 requests" in proc.stdout
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["requests"] == N_PROMPTS and summary["errors"] == 0 and summary["complete"]
    assert summary["replicas"] == 2 and summary["stages"] == 2
    assert summary["generated_tokens"] == sum(r["generated_tokens"] for r in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.job.json", "out.jsonl.summary.json"]


def test_kill9_and_restart_writes_every_id_once(tiny_ckpt, prompts_file, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    common = [f"model.path={tiny_ckpt}", f"input={prompts_file}", f"output={out}", f"max_new_tokens={MAX_NEW}",
              "device=cpu"]
    # 2 replicas, deliberately slow (one sequence, one token per step) so the kill lands mid-run
    proc = subprocess.Popen(
        torchrun_cmd(2, common + ["pipeline.data_parallel=2", "inference.batch_size=1",
                                  "inference.max_batch_tokens=1", "progress=false"]),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    parts = [tmp_path / "out.jsonl.part-0", tmp_path / "out.jsonl.part-1"]

    def lines_written() -> int:
        return sum(p.read_bytes().count(b"\n") for p in parts if p.exists())

    deadline = time.monotonic() + 180
    workers: list[int] = []
    try:
        while lines_written() < 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun only: its workers run in sessions of their own
        proc.wait()
    try:  # they notice their launcher is gone and exit by themselves; until then the output stays locked
        assert len(workers) == 2 and wait_gone(workers, 60) == []
    finally:
        kill_all(workers)
    written = lines_written()
    assert 12 <= written < N_PROMPTS, f"the run was not caught mid-way ({written} lines)"
    assert not out.exists() and not (tmp_path / "out.jsonl.summary.json").exists()
    with open(parts[0], "a", encoding="utf-8") as f:  # a write cut off half-way
        f.write('{"id": "r999", "line": 3, "prompt": "the c')

    # restart with another topology (one process): it resumes, repairs, and never duplicates
    assert run_inprocess(common + ["progress=false"]) == 0
    got = read_jsonl(out)
    assert_same_results(got, reference)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["skipped_already_done"] >= written - 2  # done lines were skipped, not redone
    assert summary["requests"] + summary["skipped_already_done"] == N_PROMPTS
    assert not any(p.exists() for p in parts)

    # a third run finds everything done and leaves the output as it is
    before = out.read_bytes()
    assert run_inprocess(common + ["progress=false"]) == 0
    assert out.read_bytes() == before
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["requests"] == 0


BAD_LINES = [
    '{"id": "ok-1", "prompt": "the cat sat"}',
    'this is not json',
    '{"id": "no-prompt", "text": "the cat"}',
    '{"id": "empty", "prompt": "   "}',
    '',
    '{"id": "too-long", "prompt": "' + " ".join(["cat"] * 4100) + '"}',
    '[1, 2, 3]',
    '{"id": "zero-new", "prompt": "two dogs", "max_new_tokens": 0}',
    '{"id": "neg-temp", "prompt": "two dogs", "temperature": -1}',
    '{"custom_id": "ok-2", "body": {"messages": [{"role": "user", "content": "red boxes"}], "max_tokens": 4}}',
    '{"id": "ok-3", "prompt": "blue kite flew"',
    '{"id": "ok-4", "prompt": "blue kite flew"}',
]


def test_malformed_lines_go_to_the_errors_file(tiny_ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(("\n".join(BAD_LINES) + "\n").encode()
                    + b'{"id": "latin-1", "prompt": "caf\xe9"}\n{"id": "nan-temp", "prompt": "a cat", "temperature": NaN}\n')
    out = tmp_path / "out.jsonl"
    args = [f"model.path={tiny_ckpt}", f"input={inp}", f"output={out}", "max_new_tokens=4", "device=cpu",
            "progress=false"]
    assert run_inprocess(args) == 0
    results = read_jsonl(out)
    assert [r["id"] for r in results] == ["ok-1", "ok-2", "ok-4"]
    assert [r["line"] for r in results] == [1, 10, 12]
    assert results[1]["generated_tokens"] <= 4
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4, 6, 7, 8, 9, 11, 13, 14]
    reasons = {e["line"]: e["error"] for e in errors}
    assert "not valid JSON" in reasons[2] and "line 2" in reasons[2]
    assert "no \"prompt\"" in reasons[3] and errors[1]["id"] == "no-prompt"
    assert "empty" in reasons[4]
    assert "exceeds the model's limit of 4096 tokens" in reasons[6]
    assert "JSON object" in reasons[7]
    assert "max_new_tokens=0" in reasons[8]
    assert "line 9 (id 'neg-temp'): " in reasons[9] and "temperature" in reasons[9]
    assert "line 13: not valid UTF-8 (byte 0xe9" in reasons[13] and errors[8]["id"] is None
    assert "line 14 (id 'nan-temp'): temperature=nan is not a finite number" in reasons[14]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["requests"] == 3 and summary["errors"] == 10 and summary["complete"]

    # a rerun checks the bad lines again, finds the good ones done, duplicates nothing
    before = out.read_bytes()
    assert run_inprocess(args) == 0
    assert out.read_bytes() == before
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 10

    # a rerun that fails on a bad setting leaves the last run's errors and summary alone
    with pytest.raises(ConfigError, match="sampling.temperature='hot'"):
        run_inprocess(args + ["sampling.temperature=hot"])
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 10
    assert (tmp_path / "out.jsonl.summary.json").is_file()


def test_every_line_rejected_is_an_error(tiny_ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(InputError, match="every input line was rejected \\(2 errors"):
        run_inprocess([f"model.path={tiny_ckpt}", f"input={inp}", f"output={tmp_path / 'out.jsonl'}", "device=cpu",
                       "progress=false"])
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 2


SMALL = ["the cat sat", "two dogs ran past", "a blue kite", "seven red boxes"]


def _small_input(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def test_output_is_bound_to_its_input_and_settings(tiny_ckpt, tmp_path):
    """A rerun into an output made from another input (or with other settings) is refused before
    anything is touched; overwrite=true starts over and gives what a fresh output gets."""
    a = _small_input(tmp_path / "a.jsonl", SMALL)
    b = _small_input(tmp_path / "b.jsonl", SMALL[::-1])
    out = tmp_path / "out.jsonl"
    common = [f"model.path={tiny_ckpt}", "max_new_tokens=4", "device=cpu", "progress=false"]
    assert run_inprocess(common + [f"input={a}", f"output={out}"]) == 0
    before = out.read_bytes()
    with pytest.raises(ConfigError, match=r"holds results of another input or other settings \(input .*a\.jsonl.* vs "
                                          r".*b\.jsonl.*overwrite=true"):
        run_inprocess(common + [f"input={b}", f"output={out}"])
    with pytest.raises(ConfigError, match=r"other settings \(max_new_tokens 4 vs 5\)"):
        run_inprocess(common + [f"input={a}", f"output={out}", "max_new_tokens=5"])
    with pytest.raises(ConfigError, match=r"sampling.temperature 0.0 vs 0.5"):
        run_inprocess(common + [f"input={a}", f"output={out}", "sampling.temperature=0.5"])
    assert out.read_bytes() == before
    # the same input under another path is the same input
    shutil.copy(a, tmp_path / "a_copy.jsonl")
    assert run_inprocess(common + [f"input={tmp_path / 'a_copy.jsonl'}", f"output={out}"]) == 0
    assert out.read_bytes() == before

    fresh = tmp_path / "fresh.jsonl"
    assert run_inprocess(common + [f"input={b}", f"output={fresh}"]) == 0
    assert run_inprocess(common + [f"input={b}", f"output={out}", "overwrite=true"]) == 0
    assert_same_results(read_jsonl(out), read_jsonl(fresh))


def test_a_locked_output_is_refused_until_its_job_is_gone(tiny_ckpt, tmp_path):
    inp = _small_input(tmp_path / "in.jsonl", SMALL)
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(  # another job holding the output (what a running batch job does)
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pp_runtime.io.output_files import "
         "OutputLock; OutputLock.acquire(Path(sys.argv[1]), 'x'); print('locked', flush=True); time.sleep(600)",
         str(tmp_path / "out.jsonl.lock")], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [f"model.path={tiny_ckpt}", f"input={inp}", f"output={out}", "max_new_tokens=4", "device=cpu",
                "progress=false"]
        with pytest.raises(ConfigError, match=rf"output .*out\.jsonl is in use by another job \(pid {holder.pid} on "):
            run_inprocess(args)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_inprocess(args) == 0  # a lock left by a dead job is stale: taken over
    assert [r["id"] for r in read_jsonl(out)] == ["q0", "q1", "q2", "q3"]
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_strict_fails_cleanly_on_every_rank(tiny_ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "the cat"}\n{"id": "b", "prompt": \n{"id": "c", "prompt": "a mat"}\n')
    out = tmp_path / "out.jsonl"
    args = [f"model.path={tiny_ckpt}", f"input={inp}", f"output={out}", "max_new_tokens=4", "device=cpu",
            "pipeline.data_parallel=2", "strict=true"]
    # the two ranks started directly (what torchrun would set up), so each one's exit code is visible
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch" / "batch_infer.py"), *args],
                              env={**_env(), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for rank, proc in enumerate(procs):  # line 2 belongs to replica 1, yet both ranks report it
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"[rank {rank}] error: ")
        assert "line 2: not valid JSON" in lines[0] and "strict=true" in lines[0]
    assert not out.exists() and not (tmp_path / "out.jsonl.part-0").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="needs input="):
        run_inprocess(["device=cpu", f"output={tmp_path / 'o.jsonl'}"])
    with pytest.raises(InputError, match="does not exist"):
        run_inprocess(["device=cpu", f"input={tmp_path / 'missing.jsonl'}", f"output={tmp_path / 'o.jsonl'}"])


def test_repair_and_merge(tmp_path):
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    a.write_bytes(b'{"line": 3, "v": "a3"}\n{"line": 1, "v": "a1"}\n{"line": 5, "v": "a5"')
    b.write_bytes(b'{"line": 2, "v": "b2"}\n{"line": 1, "v": "b1"}\n\x00\x00\x00\n')
    assert repair_jsonl(a) == len(b'{"line": 5, "v": "a5"')
    assert repair_jsonl(b) == 4
    assert repair_jsonl(a) == 0
    assert merge_results([a, b], dest) == 3
    assert [json.loads(x)["v"] for x in dest.read_text().splitlines()] == ["a1", "b2", "a3"]
    s = LineSet()
    for n in (0, 7, 8, 100_000):
        s.add(n)
    assert 7 in s and 100_000 in s and 9 not in s and 10**9 not in s and len(s) == 4
    assert 100_000 in LineSet(bytes(s.bits))
