"""The fine-tuning run that works out of the box, and training you can watch.

`torchrun --nproc_per_node=2 launch/finetune.py` with no arguments (run once, module fixture):
the loss goes down, the export answers held-out questions at least as well as the shipped demo
model (both scored by `launch/infer.py` on the same questions), and the run's own evaluation
agrees answer for answer with that independent path. A 2-job `--multirun` sweep under torchrun
writes separate outputs, with TensorBoard event files read back by tensorboard's own reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dist_utils import free_port
from pp_runtime.demo import MODEL_DIR, task
from pp_runtime.demo.make_demo import evaluate
from pp_runtime.errors import ConfigError

FINETUNE = str(REPO / "launch" / "finetune.py")


def torchrun(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           FINETUNE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    cwd = tmp_path_factory.mktemp("demo_finetune")
    r = torchrun([], cwd, timeout=420)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    runs = list((cwd / "outputs" / "finetune").iterdir())
    assert len(runs) == 1, runs
    return r, cwd, runs[0]


@pytest.mark.timeout(480)
def test_no_argument_finetune_trains_exports_and_scores(demo_run):
    r, cwd, out = demo_run
    assert sorted(os.listdir(cwd)) == ["outputs"]  # nothing else in the caller's folder
    assert "step 200/200" in r.stdout and "| ETA " in r.stdout  # plain progress lines: stdout is not a terminal
    rows = metrics(out / "metrics.jsonl")
    assert [x["step"] for x in rows] == list(range(1, 201))
    first, last = [x["loss"] for x in rows[:20]], [x["loss"] for x in rows[-20:]]
    assert sum(last) / 20 < sum(first) / 20, (first, last)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"params.json", "consolidated.safetensors", "tokenizer.model"} <= set(os.listdir(out / "export"))


@pytest.mark.timeout(480)
def test_export_answers_heldout_questions_at_least_as_well_as_the_shipped_model(demo_run, tmp_path):
    r, _, out = demo_run
    graded = metrics(out / "eval.jsonl")
    assert len(graded) == 200
    questions = [task.Example(*task.parse_prompt(g["prompt"])) for g in graded]
    assert all(task.is_heldout(q.a, q.b) for q in questions) and len({q.prompt for q in questions}) == 200
    tuned = evaluate(out / "export", questions, nproc=2, work=tmp_path / "tuned", timeout=240)
    shipped = evaluate(MODEL_DIR, questions, nproc=2, work=tmp_path / "shipped", timeout=240)
    assert tuned["correct"] >= shipped["correct"], (tuned["correct"], shipped["correct"])
    # the run's own evaluation (in the training process group) against launch/infer.py on the export
    assert [g["completion"] for g in graded] == [x["completion"] for x in tuned["results"]]
    assert f"eval: {tuned['correct']}/200 = " in r.stdout


@pytest.mark.timeout(300)
def test_multirun_sweep_under_torchrun_with_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = torchrun(["-m", "train.lr=1e-4,1e-3", "train.steps=3", "train.warmup_steps=1", "data.demo_questions=400",
                  "eval.demo_questions=4", "metrics.tensorboard=true", "metrics.log_every=1", "device=cpu"],
                 tmp_path, timeout=240)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert os.listdir(tmp_path) == ["outputs"]
    (sweep,) = (tmp_path / "outputs" / "finetune").iterdir()
    assert sweep.name.startswith("multirun_") and sorted(os.listdir(sweep)) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 1e-4), ("1", 1e-3)):
        rows = metrics(sweep / job / "metrics.jsonl")
        assert [x["step"] for x in rows] == [1, 2, 3] and rows[0]["lr"] == pytest.approx(lr)
        assert (sweep / job / "export" / "consolidated.safetensors").is_file()
        events = EventAccumulator(str(sweep / job / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "bubble/rank_0", "bubble/rank_1",
                "memory/peak_gib/stage_0", "memory/peak_gib/stage_1"} <= tags, tags
        logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
        assert logged == [(x["step"], pytest.approx(x["loss"], rel=1e-6)) for x in rows]
        assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("bubble/rank_1"))
        assert all(e.value > 0 for e in events.Scalars("memory/peak_gib/stage_1"))


@pytest.mark.parametrize("package, setting, hint", [("tensorboard", "tensorboard", "pip install tensorboard"),
                                                    ("wandb", "wandb", "pip install wandb")])
def test_a_missing_logger_package_is_named_with_its_install(package, setting, hint, monkeypatch):
    from pp_runtime.jobs.config import load_config
    from pp_runtime.training.metrics import check_loggers

    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    value = "true" if setting == "tensorboard" else "my-project"
    with pytest.raises(ConfigError, match=hint):
        check_loggers(load_config("finetune", [f"metrics.{setting}={value}"]).metrics)
