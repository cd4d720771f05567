"""What a new user meets first: reruns of a fine-tune in the same folder, the CPU thread default,
schedule spellings, where the tokenizer comes from, and previewing the SLURM scripts.

In-process runs on the tiny checkpoint (a few steps each); subprocesses only where the process
start itself is under test (threads, bash scripts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_text_docs
from dist_utils import one_thread
from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.jobs.config import load_config
from pp_runtime.training import checkpoint as tc


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_text_docs(tmp_path_factory.mktemp("first_run") / "train.jsonl")


def finetune(data: Path, model: Path, out: Path, *extra: str) -> None:
    from pp_runtime.jobs.finetune import run

    args = [f"model.path={model}", f"data.path={data}", "data.seq_len=24", f"out_dir={out}", "train.steps=2",
            "train.batch_size=4", "schedule.microbatches=2", "device=cpu", "model.dtype=float32", *extra]
    with one_thread():
        assert run(load_config("finetune", args)) == 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "consolidated.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ fine-tune reruns
def test_rerun_with_other_settings_refuses_and_the_same_run_resumes(data_file, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    finetune(data_file, tiny_ckpt, run, f"export={tmp_path / 'A'}")
    capsys.readouterr()
    # another learning rate: refused before anything is trained or exported, naming the setting and the ways out
    with pytest.raises(CheckpointError, match=r"holds another run \(step 2; train\.lr: checkpoint 0\.0003 vs now 1e-05\)"
                                              r".*own out_dir=.*resume=null to start over"):
        finetune(data_file, tiny_ckpt, run, "train.lr=1e-5", f"export={tmp_path / 'B'}")
    assert not (tmp_path / "B").exists()
    # another model folder (the same weights copied elsewhere): refused too
    copy = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, copy)
    with pytest.raises(CheckpointError, match=re.escape(f"model.path: checkpoint '{tiny_ckpt}' vs now '{copy}'")):
        finetune(data_file, copy, run)
    # the same run with more steps resumes at step 2 and trains step 3 only
    finetune(data_file, tiny_ckpt, run, "train.steps=3")
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out
    assert "step 3/3" in out and "step 1/3" not in out
    # run again: nothing left to do, and the export says whose weights it holds
    finetune(data_file, tiny_ckpt, run, "train.steps=3", f"export={tmp_path / 'C'}")
    out = capsys.readouterr().out
    assert "nothing left to do: the checkpoint is at step 3 and train.steps=3" in out
    assert f"exported step 3 to {tmp_path / 'C'}" in out and "no step ran now" in out
    assert tc.read_manifest(run / "checkpoints" / "step_00000003")["run"]["train.lr"] == 3e-4


def test_resume_null_starts_over_like_a_fresh_run(data_file, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    finetune(data_file, tiny_ckpt, run, "train.steps=3", "checkpoint.every=1", f"export={tmp_path / 'A'}")
    finetune(data_file, tiny_ckpt, run, "train.lr=1e-5", "resume=null", f"export={tmp_path / 'B'}")
    assert "resume=null: removed 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert [p.name for p in tc.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    # the reference: the same settings in a folder of their own
    finetune(data_file, tiny_ckpt, tmp_path / "fresh", "train.lr=1e-5", f"export={tmp_path / 'fresh_export'}")
    assert same_weights(tmp_path / "B", tmp_path / "fresh_export")
    assert not same_weights(tmp_path / "B", tmp_path / "A")


# ------------------------------------------------------------------------------ threads
def _thread_count(env_extra: dict[str, str]) -> tuple[int, str, str]:
    """torch's intra-op threads in a fresh process that went through the entry points' start."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    code = ("from pp_runtime.jobs.cli import run_main\n"
            "def main(argv):\n"
            "    import os, torch\n"
            "    print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))\n"
            "run_main(main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **env_extra}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n, policy = r.stdout.split()
    return int(n), policy, r.stderr


def test_threads_follow_the_cores_and_ranks_unless_omp_num_threads_is_set():
    cores = len(os.sched_getaffinity(0))
    # 2 ranks on this machine (torchrun's LOCAL_WORLD_SIZE): half the cores each, waiting threads sleep
    assert _thread_count({"LOCAL_WORLD_SIZE": "2"})[:2] == (max(1, cores // 2), "PASSIVE")
    # the user's setting wins and nothing else is touched
    assert _thread_count({"OMP_NUM_THREADS": "1"})[:2] == (1, "None")


# ------------------------------------------------------------------------------ schedule names
@pytest.mark.parametrize("spelling", ["zb-h1", "zb_h1"])
def test_both_zb_h1_spellings_select_the_zero_bubble_schedule(spelling, tmp_path, capsys):
    from pp_runtime.jobs.finetune import make_schedule
    from pp_runtime.training.schedules import schedule_zb_h1
    from pp_runtime.training.timeline import main as timeline

    cfg = load_config("finetune", [f"schedule={spelling}", "schedule.microbatches=4", "data.path=x"])
    assert make_schedule(cfg, 2).actions == schedule_zb_h1(2, 4).actions
    assert timeline(["--schedule", spelling, "--ranks", "2", "--microbatches", "4", "--out", str(tmp_path / "t.png"),
                     "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("\n".join(f"rank {r}: {' '.join(map(str, a))}"
                                        for r, a in enumerate(schedule_zb_h1(2, 4).actions)))


def test_an_unknown_schedule_lists_the_known_ones(capsys):
    from pp_runtime.training.timeline import main as timeline

    with pytest.raises(ConfigError, match=r"Could not find 'schedule/zb-h2'; choose one of 1f1b, gpipe, interleaved, interleaved-zb, interleaved_zb, zb-h1, zb-v, zb_h1, zb_v"):
        load_config("finetune", ["schedule=zb-h2", "data.path=x"])
    with pytest.raises(SystemExit):
        timeline(["--schedule", "zb-h2", "--ranks", "2", "--microbatches", "4"])
    assert "unknown schedule 'zb-h2': choose one of gpipe, 1f1b, interleaved, zb-h1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ tokenizer
def _infer(*args: str) -> int:
    from pp_runtime.jobs.infer import run

    with one_thread():
        return run(load_config("infer", [*args, "max_new_tokens=4", "device=cpu", "progress=false"]))


def test_model_tokenizer_gives_inference_a_tokenizer_from_elsewhere(tiny_ckpt, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("params.json", "consolidated.safetensors"):
        shutil.copyfile(tiny_ckpt / name, bare / name)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                                               for i, p in enumerate(["the cat sat", "two dogs ran past"])))
    with pytest.raises(CheckpointError, match="no tokenizer in .*set model.tokenizer=PATH"):
        _infer(f"model.path={bare}", f"input={tmp_path / 'in.jsonl'}")
    assert _infer(f"model.path={bare}", f"model.tokenizer={tiny_ckpt / 'tokenizer.model'}",
                  f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'bare.jsonl'}") == 0
    # the reference: the same weights with the tokenizer in their folder
    assert _infer(f"model.path={tiny_ckpt}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'ref.jsonl'}") == 0
    got, ref = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("bare.jsonl", "ref.jsonl"))
    assert [(r["completion"], r["tokens"]) for r in got] == [(r["completion"], r["tokens"]) for r in ref]


def test_random_checkpoint_writes_a_tokenizer_inference_can_use(tmp_path, capsys):
    from pp_runtime.checkpoints import random_weights as random_checkpoint
    from pp_runtime.io.tokenizer import find_mistral_v1_tokenizer

    out = tmp_path / "rand"
    assert random_checkpoint.main(["--preset", "tiny", "--layers", "1", "--dtype", "float32", "--out", str(out)]) == 0
    v1 = find_mistral_v1_tokenizer()
    if v1 is None:  # mistral-common is optional: the weights come with a note saying how to get one
        assert not (out / "tokenizer.model").exists()
        assert "pip install mistral-common" in capsys.readouterr().err
        return
    assert (out / "tokenizer.model").read_bytes() == v1.read_bytes()
    assert json.loads((out / "params.json").read_text())["vocab_size"] == 32000  # the tokenizer's, not tiny's 256
    assert _infer(f"model.path={out}", "prompt=Hello world") == 0


# ------------------------------------------------------------------------------ SLURM preview
@pytest.mark.parametrize("script, entry", [("finetune.sbatch", "finetune.py"), ("batch_infer.sbatch", "batch_infer.py")])
def test_sbatch_scripts_preview_outside_an_allocation(script, entry, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    path = REPO / "launch" / "slurm" / script
    r = subprocess.run(["bash", str(path), "input=a.jsonl"], cwd=tmp_path, env={**env, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not inside a SLURM allocation" in r.stderr and "DRY_RUN=1" in r.stderr
    r = subprocess.run(["bash", str(path), "input=a.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**env, "PYTHON": sys.executable, "DRY_RUN": "1", "GPUS_PER_NODE": "2"})
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0))
    header, srun = r.stdout.strip().splitlines()[-2:]
    assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in header
    assert srun.startswith("srun --nodes=1 --ntasks=1 ") and f"--cpus-per-task={cores}" in srun
    assert "--nnodes=1 --nproc_per_node=2 --rdzv_id=DRY_RUN --rdzv_backend=c10d" in srun
    assert f"{REPO}/launch/{entry} input=a.jsonl" in srun
