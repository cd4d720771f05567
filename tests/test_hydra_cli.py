"""Hydra's own command line on every entry point: --help, --cfg job, --config-dir/--config-name,
+experiment=..., and one `error:` line with exit 2 for anything wrong on it. No stray output
folders: everything here runs in an empty folder that must stay empty (or hold only the output
that was asked for)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from pp_runtime.jobs.config import load_config

LAUNCH = REPO / "launch"


def _run(script: str, args: list[str], cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


HELP = {
    "infer.py": ["model.path=DIR", 'prompt="..."', "input=FILE.jsonl", "output=FILE.jsonl", "max_new_tokens",
                 "sampling.temperature", "pipeline.stages", "inference.batch_size", "model: demo, mistral-7b"],
    "batch_infer.py": ["input=FILE.jsonl", "output=FILE.jsonl", "strict=true", "max_new_tokens",
                       "pipeline.data_parallel", "progress_interval", "experiment: batch_infer_mistral7b"],
    "finetune.py": ["model.path=DIR", "data.path=FILE.jsonl", "train.steps", "train.lr", "pipeline.stages",
                    "schedule.microbatches", "out_dir=DIR", "export=DIR", "eval.path", "metrics.tensorboard=true",
                    "metrics.wandb=PROJECT", "--multirun", "schedule: 1f1b, gpipe, interleaved, interleaved-zb, interleaved_zb, zb-h1, zb-v, zb_h1, zb_v",
                    "finetune_mistral7b_8gpu"],
}


@pytest.mark.parametrize("script", list(HELP))
def test_help_names_the_main_settings(script, tmp_path):
    r = _run(script, ["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    missing = [s for s in HELP[script] if s not in r.stdout]
    assert not missing, f"{script} --help lacks {missing}:\n{r.stdout}"
    assert "--cfg job" in r.stdout and "--config-dir DIR --config-name NAME" in r.stdout
    assert os.listdir(tmp_path) == []


def test_cfg_job_prints_hydras_composition_with_the_overrides(tmp_path):
    overrides = ["train.lr=0.123", "schedule=zb_h1", "+experiment=finetune_demo", "data.seq_len=48"]
    r = _run("finetune.py", ["--cfg", "job", *overrides], tmp_path)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["data"]["seq_len"] == 48 and printed["schedule"]["name"] == "zb-h1"
    # Hydra's own app run vs the compose path the entry points check the command line with
    assert printed == OmegaConf.to_container(load_config("finetune", overrides))
    assert printed["train"]["lr"] == 0.123  # the experiment sets 3e-4; the command line wins
    assert os.listdir(tmp_path) == []


def test_a_run_from_your_own_config_dir(tmp_path):
    """--config-dir (relative to the caller's folder) + --config-name: the file's values are used,
    and +experiment finds an experiment in that folder too."""
    mine = tmp_path / "my_exps"
    (mine / "experiment").mkdir(parents=True)
    (mine / "mine.yaml").write_text('defaults:\n  - infer\n  - _self_\nprompt: "48+75="\nmax_new_tokens: 5\ndevice: cpu\n')
    (mine / "experiment" / "longer.yaml").write_text("# @package _global_\nmax_new_tokens: 7\n")
    r = _run("infer.py", ["--config-dir", "my_exps", "--config-name", "mine"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[0] '48+75=' -> '123' (stop)" in r.stdout, r.stdout
    shown = _run("infer.py", ["--config-dir", "my_exps", "--config-name", "mine", "+experiment=longer", "--cfg", "job"],
                 tmp_path)
    assert shown.returncode == 0, shown.stderr
    cfg = yaml.safe_load(shown.stdout)
    assert (cfg["prompt"], cfg["max_new_tokens"]) == ("48+75=", 7)
    assert sorted(os.listdir(tmp_path)) == ["my_exps"]  # no outputs/, .hydra/ or multirun/


BAD = {
    # name: (script, arguments, words of the one error line)
    "unknown_key": ("infer.py", ["max_new_tokenz=3"], "Could not override 'max_new_tokenz'"),
    "unknown_experiment": ("batch_infer.py", ["+experiment=nope"], "choose one of batch_infer_mistral7b"),
    "other_jobs_experiment": ("finetune.py", ["+experiment=batch_infer_mistral7b", "--cfg", "job"],
                              "which finetune does not have"),
    "bad_key_in_a_sweep": ("finetune.py", ["-m", "train.lr=1e-4,2e-4", "train.stepz=1,2"], "Could not override 'train.stepz'"),
    "sweep_without_multirun": ("finetune.py", ["train.lr=1e-4,2e-4"], "add --multirun to sweep"),
    "missing_config_name": ("finetune.py", ["--config-name", "nope"], "Cannot find primary config 'nope'"),
    "missing_config_dir": ("infer.py", ["--config-dir", "absent", "--cfg", "job"], "is not a folder"),
    "multirun_for_inference": ("infer.py", ["--multirun", "max_new_tokens=3,4"], "--multirun is for fine-tuning sweeps"),
    "unknown_flag": ("finetune.py", ["--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_command_line_is_one_error_line_and_exit_2(name, tmp_path):
    script, args, words = BAD[name]
    r = _run(script, args, tmp_path)
    assert r.returncode == 2, f"{name}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("experiment, job, shape", [
    ("finetune_demo", "finetune", None), ("finetune_mistral7b_8gpu", "finetune", "mistral-7b"),
    ("finetune_mixtral8x7b_8gpu", "finetune", "mixtral-8x7b"), ("finetune_mixtral8x7b_lora_2gpu", "finetune", "mixtral-8x7b"),
    ("batch_infer_mistral7b", "batch_infer", "mistral-7b")])
def test_experiments_compose_into_runnable_shapes(experiment, job, shape):
    """Each experiment composes with its job, and its pipeline, schedule and batch fit its model."""
    from pp_runtime.model.args import preset
    from pp_runtime.model.partition import plan_for
    from pp_runtime.training.data import check_batch_shape
    from pp_runtime.training.schedules import build_schedule, check_microbatches
    from pp_runtime.training.simulator import simulate

    cfg = load_config(job, [f"+experiment={experiment}"])
    stages = cfg.pipeline.stages or 2
    if job == "finetune":
        check_microbatches(cfg.schedule.name, stages, cfg.schedule.microbatches)
        check_batch_shape(cfg.train.batch_size, cfg.pipeline.data_parallel, cfg.schedule.microbatches)
        simulate(build_schedule(cfg.schedule.name, stages, cfg.schedule.microbatches, cfg.schedule.virtual_stages))
        from pp_runtime.training.lora import export_format, lora_config

        export_format(cfg, lora_config(cfg.train.lora))  # LoRA settings and export format agree
    if shape is None:
        assert cfg.model.path is None and cfg.data.path is None  # the demo: model and data built in
    else:
        assert OmegaConf.is_missing(cfg.model, "path")  # the user names the checkpoint
        assert len(plan_for(preset(shape), stages, training=job == "finetune").stages) == stages


def test_every_engine_setting_is_a_config_key_with_the_dataclass_default():
    """The `inference` group's schema is the engine's own dataclass: each of its fields can be set from
    the command line (inference.attention and inference.gpu_memory_fraction once could not: their
    defaults lived only in the dataclass), and a value of the wrong type is one line."""
    import dataclasses

    from pp_runtime.errors import ConfigError
    from pp_runtime.inference.engine import InferenceConfig

    defaults = {f.name: f.default for f in dataclasses.fields(InferenceConfig)}
    assert OmegaConf.to_container(load_config("infer", []).inference) == defaults
    cfg = load_config("batch_infer", ["inference.attention=sdpa", "inference.gpu_memory_fraction=0.5"])
    engine = InferenceConfig(**cfg.inference)
    assert engine.attention == "sdpa" and engine.gpu_memory_fraction == 0.5
    with pytest.raises(ConfigError, match=r"inference\.batch_size=abc.*could not be converted to Integer"):
        load_config("infer", ["inference.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"inference\.attention='xyz': use auto, sdpa or triton"):
        InferenceConfig(**load_config("infer", ["inference.attention=xyz"]).inference)
    assert OmegaConf.to_container(load_config("finetune", []).pipeline) == {"stages": None, "data_parallel": 1,
                                                                           "split": None}
