"""Bad input and non-finite numbers end a job with one user error (PPRuntimeError, which
pp_runtime/jobs/cli.py prints as one `error:` line with exit 2) before any generation or training, and
never write an invalid or silently wrong result. In-process, one rank: no interpreter start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, write_text_docs
from pp_runtime.jobs import infer as infer_job
from ckpt_helpers import save_hf_checkpoint
from pp_runtime.errors import CheckpointError, ConfigError, InputError, TrainingError
from pp_runtime.jobs.config import load_config


def run_job(job: str, args: list[str]) -> int:
    from pp_runtime.jobs import batch as batch_job
    from pp_runtime.jobs import finetune as finetune_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"infer": infer_job.run, "batch_infer": batch_job.run, "finetune": finetune_job.run}[job](
            load_config(job, args))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if generation starts: the error must come before any work."""
    def refuse(*a, **k):
        raise AssertionError("generation started before the error was found")

    monkeypatch.setattr(infer_job, "run_pipeline", refuse)


def _damage(f: Path, how: str) -> None:
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[how])


@pytest.fixture(scope="module")
def hf_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint in Hugging Face layout (config.json + model*.safetensors)."""
    from pp_runtime.checkpoints.formats import load_model_args

    out = tmp_path_factory.mktemp("tiny_hf")
    args = load_model_args(tiny_ckpt)
    save_hf_checkpoint(out, args, load_file(str(tiny_ckpt / "consolidated.safetensors")))
    shutil.copy(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_a_checkpoint_error(fmt, how, tiny_ckpt, hf_ckpt, tmp_path, no_generation):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt if fmt == "mistral" else hf_ckpt, ckpt)
    weights = sorted(ckpt.glob("consolidated*.safetensors" if fmt == "mistral" else "model*.safetensors"))
    _damage(weights[0], how)
    with pytest.raises(CheckpointError, match=rf"{weights[0].name} is not a readable safetensors file"):
        run_job("infer", [f"model.path={ckpt}", "prompt=the cat", "device=cpu"])


@pytest.mark.parametrize("how", ["garbage", "empty"])
def test_damaged_tokenizer_is_a_checkpoint_error(how, tiny_ckpt, tmp_path, no_generation):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _damage(ckpt / "tokenizer.model", how)
    with pytest.raises(CheckpointError, match="is not a sentencepiece tokenizer model"):
        run_job("infer", [f"model.path={ckpt}", "prompt=the cat", "device=cpu"])


def test_nan_weight_is_refused_naming_the_tensor(tiny_ckpt, tmp_path, no_generation):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    state = load_file(str(ckpt / "consolidated.safetensors"))
    state["layers.2.feed_forward.w3.weight"][3, 5] = float("nan")
    save_file(state, str(ckpt / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor layers\.2\.feed_forward\.w3\.weight holds 1 NaN/inf value"):
        run_job("infer", [f"model.path={ckpt}", "prompt=the cat", "device=cpu"])


@pytest.mark.parametrize("override, message", [
    ("sampling.temperature=nan", r"sampling\.temperature=.*nan.* is not a finite number"),
    ("sampling.temperature=hot", r"sampling\.temperature='hot' is not a finite number"),
    ("sampling.top_k=2.5", r"sampling\.top_k=2\.5 is not an integer"),
    ("pipeline.split=abc", r"pipeline\.split='abc' must be a list of layers per stage"),
])
def test_bad_setting_is_a_config_error(override, message, tiny_ckpt, no_generation):
    with pytest.raises(ConfigError, match=message):
        run_job("infer", [f"model.path={tiny_ckpt}", "prompt=the cat", "device=cpu", override])


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("bad, message", [
    (b'{"id": "caf\xe9", "prompt": "a cat"}', r"in\.jsonl line 3: not valid UTF-8 \(byte 0xe9 at column 12\)"),
    (b'{"id": "hot", "prompt": "a cat", "temperature": NaN}', r"in\.jsonl line 3 \(id 'hot'\): temperature=nan is not"),
    (b'{"id": "neg", "prompt": "a cat", "temperature": -1}', r"in\.jsonl line 3 \(id 'neg'\): .*temperature"),
    (b'{"id": "str", "prompt": "a cat", "top_p": "high"}', r"in\.jsonl line 3 \(id 'str'\): top_p='high' is not"),
    (b'{"id": "last", "prompt": ', r"in\.jsonl line 3: not valid JSON"),
])
def test_bad_line_anywhere_stops_infer_before_generating(bad, message, tiny_ckpt, tmp_path, no_generation):
    """The bad line is the last one: found before the good lines before it are generated."""
    inp = _jsonl(tmp_path / "in.jsonl", [b'{"id": 1, "prompt": "the cat"}', b'{"id": 2, "prompt": "a mat"}', bad])
    with pytest.raises(InputError, match=message):
        run_job("infer", [f"model.path={tiny_ckpt}", f"input={inp}", f"output={tmp_path / 'out.jsonl'}",
                          "device=cpu"])


@pytest.mark.parametrize("case, message", [
    ("parent_is_a_file", r"is a file, not a folder"),
    ("output_is_a_folder", r"is a folder; give a file path"),
    ("output_is_the_input", r"is the input file; results would overwrite it"),
])
def test_unusable_output_stops_infer_before_generating(case, message, tiny_ckpt, tmp_path, no_generation):
    inp = _jsonl(tmp_path / "in.jsonl", [b'{"id": 1, "prompt": "the cat"}'])
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = {"parent_is_a_file": tmp_path / "file" / "out.jsonl", "output_is_a_folder": tmp_path / "folder",
           "output_is_the_input": inp}[case]
    with pytest.raises(ConfigError, match=message):
        run_job("infer", [f"model.path={tiny_ckpt}", f"input={inp}", f"output={out}", "device=cpu"])
    assert inp.read_bytes() == b'{"id": 1, "prompt": "the cat"}\n'


def test_non_finite_logprob_is_written_as_null():
    """JSON has no NaN: a non-finite logprob becomes null, so every output line parses."""
    from pp_runtime.inference.batching import Completion, Request
    from pp_runtime.inference.sampling import SamplingParams

    req = Request(0, "a", "the cat", [1, 5], 3, SamplingParams())
    rec = infer_job.completion_record(Completion(req, [7, 8, 9], [-0.5, float("nan"), float("-inf")], "length"), None)
    assert json.loads(json.dumps(rec, allow_nan=False))["logprobs"] == [-0.5, None, None]


# ---------------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_text_docs(tmp_path_factory.mktemp("train_data") / "train.jsonl", min_words=4)


def finetune_args(data: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["model=random", f"data.path={data}", f"data.tokenizer={tokenizer}", "data.seq_len=24", f"out_dir={out}",
            "train.steps=2", "train.batch_size=2", "schedule.microbatches=1", "train.warmup_steps=0",
            "device=cpu", "model.dtype=float32", "model.args={n_layers: 2}", "metrics.log_every=100", *extra]


@pytest.mark.parametrize("override, error, message", [
    ("train.lr=nan", ConfigError, r"train\.lr=.*nan.* must be a finite number"),
    ("train.lr=fast", ConfigError, r"train\.lr='fast' must be a finite number"),
    ("train.grad_clip=inf", ConfigError, r"train\.grad_clip=.*inf.* must be a finite number"),
    ("pipeline.split=abc", ConfigError, r"pipeline\.split='abc' must be a list"),
    ("data.seq_len=5000", ConfigError, r"data\.seq_len=5000 is longer than the model's max_seq_len=4096"),
    ("data.path=???", ConfigError, r"set data\.path=FILE\.jsonl: without it the job trains on the demo task"),
    ("out_dir=FILE/sub", ConfigError, r"out_dir: .* is a file, not a folder"),
    ("data.path=LATIN", InputError, r"latin\.jsonl line 2: not valid UTF-8 \(byte 0xe9"),
])
def test_finetune_bad_setting_is_one_user_error(override, error, message, train_file, tiny_ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    _jsonl(tmp_path / "latin.jsonl", [b'{"text": "the cat"}', b'{"text": "caf\xe9"}'])
    override = override.replace("FILE", str(tmp_path / "file")).replace("LATIN", str(tmp_path / "latin.jsonl"))
    args = finetune_args(train_file, tiny_ckpt, tmp_path / "run", override)
    if override == "data.path=???":
        args = [a for a in args if not a.startswith("data.path=")]
    with pytest.raises(error, match=message):
        run_job("finetune", args)
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not any((tmp_path / "run" / "checkpoints").iterdir())


def _saved_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    (step,) = sorted(ckpt_dir.glob("step_*"))
    return load_file(str(step / "stage000.safetensors"))


def test_non_finite_loss_stops_training_without_saving(train_file, tiny_ckpt, tmp_path):
    """lr=1e30: step 1 is finite, step 2's gradient norm is not (overflow). The run stops there and saves nothing; with
    train.skip_nonfinite=true it skips steps 2-3, counts them, and ends with step 1's weights (a
    one-step run is the reference)."""
    with pytest.raises(TrainingError, match=r"step 2: the loss is .* and the gradient norm nan; training stopped .*train\.skip_nonfinite=true"):
        run_job("finetune", finetune_args(train_file, tiny_ckpt, tmp_path / "stop", "train.lr=1e30", "train.steps=3"))
    assert not list((tmp_path / "stop" / "checkpoints").glob("step_*"))

    run_job("finetune", finetune_args(train_file, tiny_ckpt, tmp_path / "one", "train.lr=1e30", "train.steps=1",
                                      "train.min_lr=1e30"))
    run_job("finetune", finetune_args(train_file, tiny_ckpt, tmp_path / "skip", "train.lr=1e30", "train.steps=3",
                                      "train.min_lr=1e30", "train.skip_nonfinite=true"))
    metrics = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["skipped_nonfinite"]) for m in metrics] == [(1, 0), (2, 1), (3, 2)]
    assert metrics[0]["grad_norm"] is not None and metrics[1]["grad_norm"] is None  # valid JSON: null, not NaN
    one, skip = _saved_weights(tmp_path / "one" / "checkpoints"), _saved_weights(tmp_path / "skip" / "checkpoints")
    assert one.keys() == skip.keys()
    for k in one:
        assert torch.isfinite(skip[k]).all() and torch.equal(one[k], skip[k]), k


def test_resume_keeps_each_step_once_in_the_metrics(train_file, tiny_ckpt, tmp_path):
    """A crash after step 4 whose checkpoint was never written: the rerun resumes at step 2 and redoes
    3-4, whose metric lines must replace (not follow) the crashed run's."""
    args = finetune_args(train_file, tiny_ckpt, tmp_path / "run", "train.steps=4", "checkpoint.every=2")
    run_job("finetune", args)
    first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # cut off by the crash
    run_job("finetune", args)
    again = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert [m["loss"] for m in again] == pytest.approx([m["loss"] for m in first], abs=1e-6)


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_resume_from_damaged_shard_is_a_checkpoint_error(how, train_file, tiny_ckpt, tmp_path):
    args = finetune_args(train_file, tiny_ckpt, tmp_path / "run", "train.steps=1")
    run_job("finetune", args)
    (step,) = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    _damage(step / "stage000.safetensors", how)
    with pytest.raises(CheckpointError, match="stage000.safetensors is not a readable safetensors file"):
        run_job("finetune", args[:-1] + ["train.steps=2"])


# ---------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("script, args, message", [
    ("infer.py", ["model.path=DAMAGED", "prompt=hi"], "consolidated.safetensors is not a readable safetensors file"),
    ("finetune.py", ["model=random", "data.seq_len=24"], "a model trained from scratch needs a tokenizer"),
])
def test_user_error_is_one_line_and_exit_2(script, args, message, tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _damage(ckpt / "consolidated.safetensors", "truncated")
    r = subprocess.run([sys.executable, str(REPO / "launch" / script), *[a.replace("DAMAGED", str(ckpt)) for a in args],
                        "device=cpu"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
