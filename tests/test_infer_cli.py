"""launch/infer.py end to end: outputs, relative paths, and one-line errors on every rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from dist_utils import free_port

INFER = str(REPO / "launch" / "infer.py")


def _run(args: list[str], cwd, timeout: float = 120, ranks: int = 1) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, INFER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", INFER, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_jsonl_in_jsonl_out_in_input_order_with_relative_paths(tiny_ckpt, tmp_path):
    prompts = ["the cat sat on", "two dogs ran past seven red boxes and one blue kite flew over green hills",
               "small fish swim", "a"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    r = _run([f"model.path={tiny_ckpt}", "input=in.jsonl", "output=sub/out.jsonl", "max_new_tokens=5",
              "inference.batch_size=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "sub" / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["p0", "p1", "p2", "p3"]
    for x, p in zip(lines, prompts):
        assert x["prompt"] == p and x["finish_reason"] in ("stop", "length")
        assert len(x["tokens"]) == x["generated_tokens"] <= 5 and isinstance(x["completion"], str)
    assert "stage 0 (rank 0): embedding, layers 0-3, norm+head" in r.stdout
    assert "busy:" in r.stdout and "prefill" in r.stdout


def test_two_stages_and_two_replicas_write_the_same_file_as_one(tiny_ckpt, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "the cat sat on a mat " * i}) + "\n"
                                               for i in range(1, 6)))
    base = [f"model.path={tiny_ckpt}", "input=in.jsonl", "max_new_tokens=6", "model.dtype=float64"]
    one = _run(base + ["output=one.jsonl"], cwd=tmp_path)
    two = _run(base + ["output=two.jsonl", "inference.microbatches=3"], cwd=tmp_path, ranks=2)
    replicas = _run(base + ["output=dp.jsonl", "pipeline.stages=1", "pipeline.data_parallel=2", "progress_interval=0.1"],
                    cwd=tmp_path, ranks=2)
    for r in (one, two, replicas):
        assert r.returncode == 0, r.stderr
    a = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    for other in ("two.jsonl", "dp.jsonl"):  # 2 stages; 2 replicas whose results are gathered in input order
        b = [json.loads(x) for x in (tmp_path / other).read_text().splitlines()]
        assert [(x["id"], x["tokens"]) for x in a] == [(x["id"], x["tokens"]) for x in b]
    assert "5 prompts" in replicas.stdout  # the summary adds up both replicas
    # stderr is a pipe, not a terminal: plain progress lines; the last counts both replicas (rank 0's has 3)
    lines = [ln for ln in replicas.stderr.splitlines() if ln.startswith("progress: ")]
    assert lines and lines[-1].startswith("progress: 5/5 (100.0%) prompts | "), replicas.stderr
    assert "\r" not in replicas.stderr
    assert "threads: " in one.stdout


def _bad_params(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(tiny_ckpt, bad)
    params = json.loads((bad / "params.json").read_text())
    params["dim"] = 96
    (bad / "params.json").write_text(json.dumps(params))
    return bad


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "does not exist"),
        ("params_mismatch", "params.json"),
        ("empty_prompt", "empty"),
        ("unknown_override", "bad override"),
        ("unquoted_equals", """quote a value that holds '='"""),
        ("malformed_jsonl", "line 2: not valid JSON"),
        ("missing_input", "does not exist; check input="),
    ],
)
def test_bad_input_gives_one_line_error(case, expected, tiny_ckpt, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "the cat"}\n{"id": 2, "prompt": \n')
    args = {
        "missing_model": [f"model.path={tmp_path / 'nope'}", "prompt=hi"],
        "params_mismatch": [f"model.path={_bad_params(tiny_ckpt, tmp_path)}", "prompt=hi"],
        "empty_prompt": [f"model.path={tiny_ckpt}", "prompt=' '"],
        "unknown_override": [f"model.path={tiny_ckpt}", "prompt=hi", "max_new_tokenz=3"],
        "unquoted_equals": [f"model.path={tiny_ckpt}", "prompt=1+1="],
        "malformed_jsonl": [f"model.path={tiny_ckpt}", "input=bad.jsonl"],
        "missing_input": [f"model.path={tiny_ckpt}", "input=absent.jsonl"],
    }[case]
    r = _run(args, cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_request_on_rank0_stops_every_rank_quickly(tiny_ckpt, tmp_path):
    """An over-long request found by stage 0 aborts the pipeline: all 3 ranks exit non-zero with the message."""
    start = time.monotonic()
    r = _run([f"model.path={tiny_ckpt}", "prompt=the cat sat", "max_new_tokens=5000"], cwd=tmp_path, ranks=3, timeout=90)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    for rank in range(3):
        assert f"[rank {rank}] error:" in r.stderr, r.stderr
    assert "limit of 4096 tokens" in r.stderr
    assert elapsed < 60


@pytest.mark.parametrize("case", ["no_tokenizer", "missing_input"])
def test_first_stage_setup_error_reaches_every_rank(case, tiny_ckpt, tmp_path):
    """Only the first stage reads the tokenizer and the input file; the other ranks still print the
    same one-line error and exit, instead of a broken-connection traceback or a hang."""
    ckpt = tiny_ckpt
    if case == "no_tokenizer":
        ckpt = tmp_path / "no_tok"
        shutil.copytree(tiny_ckpt, ckpt)
        (ckpt / "tokenizer.model").unlink()
    args = [f"model.path={ckpt}", "prompt=hi" if case == "no_tokenizer" else "input=absent.jsonl"]
    r = _run(args, cwd=tmp_path, ranks=2, timeout=90)
    assert r.returncode != 0
    expected = "no tokenizer in" if case == "no_tokenizer" else "does not exist; check input="
    for rank in range(2):
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"[rank {rank}] error:")]
        assert len(lines) == 1 and expected in lines[0], r.stderr[-3000:]
    assert "Connection closed by peer" not in r.stderr
