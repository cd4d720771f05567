"""Training checkpoints: kill -9 at the worst moments then resume gives the uninterrupted loss curve;
a checkpoint saved by 2 stages loads under 4 and 1 with the same outputs; export feeds inference."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from dist_utils import free_port, one_thread, rank_environment
from pp_runtime.checkpoints.formats import full_spec, load_stage_module
from pp_runtime.errors import CheckpointError
from pp_runtime.jobs.config import load_config
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.partition import plan_for
from pp_runtime.model.transformer import StageModule
from pp_runtime.training import checkpoint as tc

STEPS = 6


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from conftest import _WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.with_name("params.json").write_text(json.dumps(PARAMS))
    with open(path, "w") as f:
        for i in range(30):
            words = lambda k: " ".join(rng.choice(_WORDS) for _ in range(k))  # noqa: E731
            rec = {"prompt": words(4), "completion": words(3)} if i % 2 else {"text": words(rng.randint(3, 16))}
            f.write(json.dumps(rec) + "\n")
    return path


# A custom architecture trained from scratch: a params.json (next to the data) plus an inline
# override; vocab_size follows the tokenizer.
PARAMS = {"dim": 48, "n_layers": 3, "head_dim": 12, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
          "vocab_size": 200, "sliding_window": 8, "max_seq_len": 256, "norm_eps": 1e-5, "rope_theta": 10000.0}


def overrides(data_file: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    params = data_file.with_name("params.json")
    return [f"data.path={data_file}", f"data.tokenizer={tokenizer}", "data.seq_len=24", f"out_dir={out}",
            f"model.params={params}", "model.args={n_layers: 4}",
            f"train.steps={STEPS}", "train.batch_size=4", "train.warmup_steps=2", "train.lr=1e-2",
            "schedule.microbatches=2", "checkpoint.every=2", "device=cpu", "model.dtype=float32", *extra]


def losses(out: Path) -> dict[int, float]:
    """Step -> loss from the metrics file; a step re-run after a resume keeps its last value."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        found[rec["step"]] = rec["loss"]
    return found


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(rank: int, world: int, port: int, argv: list[str], kill: tuple | None) -> None:
    rank_environment(rank, world, port)
    torch.set_num_threads(1)
    if kill is not None and kill[2] == rank:
        what, step, _ = kill
        if what == "mid-shard":  # weights file written, optimizer file not
            def write_shard(tmp, stage, weights, optim):
                tc._write_tensors(tmp / tc.weights_file(stage), weights)
                if tmp.name.endswith(tc.checkpoint_name(step)):
                    _kill_self()
                tc._write_tensors(tmp / tc.optim_file(stage), optim)

            tc._write_shard = write_shard
        elif what == "in-step":  # between checkpoint writes, in the middle of a step
            from pp_runtime.training.executor import PipelineExecutor

            orig_run = PipelineExecutor.run

            def run(self, *a, **k):
                rec = orig_run(self, *a, **k)
                if _child.trainer_step == step:
                    _kill_self()
                return rec

            from pp_runtime.training.trainer import Trainer

            orig_step = Trainer.step

            def step_fn(self):
                _child.trainer_step = self.step_count + 1
                return orig_step(self)

            PipelineExecutor.run, Trainer.step = run, step_fn
    from pp_runtime.jobs.finetune import run as run_job

    run_job(load_config("finetune", argv))


def _spawn(world: int, argv: list[str], kill: tuple | None = None) -> bool:
    """True if the run finished, False if it was killed."""
    try:
        mp.start_processes(_child, args=(world, free_port(), argv, kill), nprocs=world, join=True, start_method="fork")
        return True
    except ProcessException:
        return False


@pytest.fixture(scope="module")
def uninterrupted(data_file, tiny_ckpt, tmp_path_factory) -> Path:
    """One process, no interruption, exported at the end (runs in this process: world size 1)."""
    from pp_runtime.jobs.finetune import run

    out = tmp_path_factory.mktemp("uninterrupted")
    with one_thread():
        assert run(load_config("finetune", overrides(data_file, tiny_ckpt, out, f"export={out / 'export'}"))) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(data_file, tiny_ckpt, tmp_path_factory) -> Path:
    """2 stages; killed during a checkpoint write and again between writes, resumed each time."""
    out = tmp_path_factory.mktemp("interrupted")
    root = out / "checkpoints"
    argv = overrides(data_file, tiny_ckpt, out, "resume=auto", "checkpoint.keep=3")
    # 1) kill -9 rank 1 while it writes its shard of the step-4 checkpoint
    assert not _spawn(2, argv, kill=("mid-shard", 4, 1))
    assert [p.name for p in tc.list_checkpoints(root)] == ["step_00000002"]
    assert (root / ".tmp-step_00000004").is_dir() and not (root / "step_00000004").exists()
    assert max(losses(out)) == 4
    # 2) resume from step 2; kill -9 rank 0 in the middle of step 5 (step 4 saved before it)
    assert not _spawn(2, argv, kill=("in-step", 5, 0))
    assert [p.name for p in tc.list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert not list(root.glob(".tmp-*"))
    # 3) resume from step 4 and finish
    assert _spawn(2, argv)
    assert [p.name for p in tc.list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    return out


@pytest.mark.timeout(240)
def test_kill_and_resume_gives_the_uninterrupted_loss_curve(uninterrupted, interrupted):
    ref, got = losses(uninterrupted), losses(interrupted)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:  # 2 stages vs 1 process: equal up to float32 summation order
        assert got[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}: {got[step]} vs {ref[step]}"
    assert ref[STEPS] < ref[1]


@pytest.mark.timeout(120)
def test_resume_under_another_split(interrupted, uninterrupted, data_file, tiny_ckpt, tmp_path):
    """The 2-stage step-4 checkpoint resumed by one process (weights and optimizer re-split)."""
    from pp_runtime.jobs.finetune import run

    argv = overrides(data_file, tiny_ckpt, tmp_path, f"resume={interrupted / 'checkpoints' / 'step_00000004'}")
    with one_thread():
        assert run(load_config("finetune", argv)) == 0
    got, ref = losses(tmp_path), losses(uninterrupted)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


def _chain_logits(ckpt: Path, n_stages: int) -> torch.Tensor:
    manifest = tc.read_manifest(ckpt)
    args = tc.manifest_args(manifest)
    meta = build_training_meta([[5, 11], [16]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    x = torch.arange(32) % args.vocab_size
    for spec in plan_for(args, n_stages, training=True).stages:
        with torch.device("meta"):
            module = StageModule(args, spec)
        names = list(module.state_dict())
        module.load_state_dict(tc.load_tensors(ckpt, names, manifest=manifest), assign=True)
        optim = tc.load_tensors(ckpt, tc.optim_keys(names), kind="optim", manifest=manifest)
        assert len(optim) == 3 * len(names)  # the optimizer state re-splits by name too
        x = module(x, meta, logits="all")
    return x


def test_save_with_2_stages_load_with_4_and_1(interrupted):
    ckpt = interrupted / "checkpoints" / "step_00000006"
    assert len(tc.read_manifest(ckpt)["stages"]) == 2
    two = _chain_logits(ckpt, 2)
    torch.testing.assert_close(_chain_logits(ckpt, 4), two, rtol=0, atol=0)
    torch.testing.assert_close(_chain_logits(ckpt, 1), two, rtol=0, atol=0)


def test_export_loads_for_inference(uninterrupted):
    export = uninterrupted / "export"
    assert {p.name for p in export.iterdir()} == {"params.json", "consolidated.safetensors", "tokenizer.model"}
    ckpt = tc.latest_checkpoint(uninterrupted / "checkpoints")
    args = tc.manifest_args(tc.read_manifest(ckpt))
    module = load_stage_module(export, args, full_spec(args))
    from pp_runtime.io.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(export).vocab_size
    assert json.loads((export / "params.json").read_text()) == {**PARAMS, "n_layers": 4, "vocab_size": vocab}
    torch.testing.assert_close(_chain_logits(ckpt, 1), _run(module, args), rtol=0, atol=0)
    # inference-ready: the infer job loads the folder, tokenizer included, and generates
    from pp_runtime.jobs.infer import run as infer

    with one_thread():
        assert infer(load_config("infer", [f"model.path={export}", "prompt=the cat sat", "max_new_tokens=4",
                                           "device=cpu", "progress=false"])) == 0
    # the offline command gives the same folder, in another dtype on request
    out = uninterrupted / "export-bf16"
    assert tc.main(["export", str(uninterrupted / "checkpoints"), str(out), "--dtype", "bfloat16"]) == 0
    assert load_stage_module(out, args, full_spec(args)).output.weight.dtype == torch.bfloat16


def _run(module: StageModule, args) -> torch.Tensor:
    meta = build_training_meta([[5, 11], [16]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    return module(torch.arange(32) % args.vocab_size, meta, logits="all")


def test_resume_checks(interrupted, tmp_path):
    root = interrupted / "checkpoints"
    assert tc.resolve_resume("auto", root).name == "step_00000006"
    assert tc.resolve_resume(str(root), root).name == "step_00000006"  # a checkpoint dir means its latest
    assert tc.resolve_resume(None, root) is None
    assert tc.resolve_resume("auto", tmp_path / "none") is None
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        tc.resolve_resume(str(tmp_path), root)
    manifest = tc.read_manifest(root / "step_00000006")
    import dataclasses

    other = dataclasses.replace(tc.manifest_args(manifest), dim=128)
    with pytest.raises(CheckpointError, match=r"different model \(dim: checkpoint 48 vs config 128\)"):
        tc.check_same_model(manifest, other, root / "step_00000006")
