"""The jobs' settings are typed dataclasses (pp_runtime/jobs/settings.py): the only source of defaults,
converted once at a job's start into plain objects (no OmegaConf below that), with every setting
reachable from the command line and a value of the wrong type explained by its own field's check."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pp_runtime.errors import ConfigError
from pp_runtime.inference.engine import InferenceConfig
from pp_runtime.inference.sampling import SamplingParams
from pp_runtime.jobs.config import CONF_DIR, load_config
from pp_runtime.jobs.settings import SCHEMAS, FinetuneSettings, to_settings
from pp_runtime.training.trainer import TrainConfig

JOBS = list(SCHEMAS)


@pytest.mark.parametrize("job", JOBS)
def test_job_yaml_holds_no_setting_of_its_own(job):
    """Defaults live in the dataclasses: a job's YAML only picks group presets and Hydra's behaviour."""
    raw = yaml.safe_load((CONF_DIR / f"{job}.yaml").read_text())
    assert set(raw) <= {"defaults", "hydra"}, set(raw)
    assert raw["defaults"][0] == f"{job}_schema"


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(key, type) of every setting of a schema, nested groups flattened."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += _leaves(kind, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", kind))
    return out


def _plain_objects_only(obj, where="cfg"):
    assert not OmegaConf.is_config(obj), f"{where} is still an OmegaConf node"
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _plain_objects_only(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _plain_objects_only(x, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _plain_objects_only(x, f"{where}[{k!r}]")


@pytest.mark.parametrize("job", JOBS)
def test_converted_settings_are_the_library_dataclasses(job):
    settings = to_settings(load_config(job, ["model.args={dim: 64}"] if job == "finetune" else []), job)
    assert isinstance(settings, SCHEMAS[job])
    _plain_objects_only(settings)
    if job == "finetune":
        assert isinstance(settings.train, TrainConfig) and settings.model.args == {"dim": 64}
    else:
        assert isinstance(settings.inference, InferenceConfig) and isinstance(settings.sampling, SamplingParams)


def test_the_trainer_defaults_are_the_runs_defaults():
    """TrainConfig's own defaults once differed from the YAML's (100 steps of 8 rows against 200 of 16)."""
    train = to_settings(load_config("finetune", []), "finetune").train
    assert {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainConfig)} == dataclasses.asdict(TrainConfig())


# a value of each setting's type that differs from every default
SAMPLE = {int: 3, float: 0.5, bool: True, str: "x"}


@pytest.mark.parametrize("job", JOBS)
def test_every_setting_is_an_override(job):
    """Each field of the schema can be set from the command line and arrives converted, typed."""
    for key, kind in _leaves(SCHEMAS[job]):
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        if base not in SAMPLE:
            continue  # lists, mappings, Any: covered by their own tests
        value = SAMPLE[base]
        settings = to_settings(load_config(job, [f"{key}={value}"]), job) if not _checked(key) else None
        if settings is None:
            with pytest.raises(ConfigError):  # the field's own check refuses the sample value
                to_settings(load_config(job, [f"{key}={value}"]), job)
            continue
        got = settings
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value and type(got) is base, (key, got)


def _checked(key: str) -> bool:
    """Settings whose own check refuses the generic sample value (outside their choices)."""
    return key in {"inference.attention", "train.optimizer", "train.zero"}


def test_a_value_of_the_wrong_type_is_explained_by_its_field():
    with pytest.raises(ConfigError, match=r"sampling\.top_k='few' is not an integer .*could not be converted to Int"):
        load_config("batch_infer", ["sampling.top_k=few"])
    with pytest.raises(ConfigError, match=r"train\.batch_size='many' must be an integer"):
        load_config("finetune", ["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"data\.seq_len=abc.*could not be converted to Integer"):
        load_config("finetune", ["data.seq_len=abc"])  # no check of its own: Hydra's words


def test_a_missing_value_names_the_setting():
    with pytest.raises(ConfigError, match=r"this model config needs its checkpoint folder: set model\.path=DIR"):
        to_settings(load_config("infer", ["model=mistral-7b"]), "infer")
    with pytest.raises(ConfigError, match=r"eval\.path has no value \(\?\?\?\): set eval\.path="):
        to_settings(load_config("finetune", ["eval.path=???"]), "finetune")


def test_checks_run_at_conversion():
    """Values Hydra's types let through (nan, a 3-tuple of betas, a bad LoRA target) stop at conversion."""
    for override, message in [("train.lr=nan", r"train\.lr=nan must be a finite number"),
                              ("train.betas=[0.9,0.95,0.99]", r"train\.betas=.* must be a pair"),
                              ("train.master_weights=maybe", r"train\.master_weights='maybe' must be auto, true or false"),
                              ("train.lora.targets=[wq,gate]", None),  # LoRA is off (rank 0): its settings are not read
                              ("train.lora.targets=[wq,gate] train.lora.rank=4", r"train\.lora\.targets=\['wq', 'gate'\] must"),
                              ("sampling.top_p=1.5", r"sampling\.top_p=1\.5 must be in \(0, 1\]")]:
        job = "infer" if override.startswith("sampling") else "finetune"
        cfg = load_config(job, override.split())
        if message is None:
            to_settings(cfg, job)
            continue
        with pytest.raises(ConfigError, match=message):
            to_settings(cfg, job)


def test_settings_pass_through_and_round_trip_to_json():
    settings = FinetuneSettings()
    assert to_settings(settings, "finetune") is settings
    import json

    json.dumps(dataclasses.asdict(to_settings(load_config("finetune", []), "finetune")))  # manifests, loggers
