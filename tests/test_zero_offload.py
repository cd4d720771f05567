"""ZeRO-1 across replicas and DeepSpeed's CPU-offloaded AdamW equal the plain step; both resume after
kill -9 on the same loss curve, ZeRO-1 also under another replica count and another split (its
checkpoints hold full per-parameter tensors gathered on replica 0 of each stage).

- ZeRO-1 (float64): 2 stages x 2 replicas (4 gloo ranks; dense 1F1B, MoE ZB-H1) and 1 stage x 2
  replicas (2 ranks, shards with padding) against the single-process float64 reference of
  tests/test_train_equivalence.py: same losses, gradient norms (so clipping) and weights after 3 steps.
- cpu_adam (float32: DeepSpeed's kernel has no float64): the same trainer with torch's AdamW, in one
  process, on 2 replicas (all-reduce) and on 2 stages x 2 replicas combined with ZeRO-1. DeepSpeed
  must import and its op must build: these tests fail, never skip, when it cannot.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from dist_utils import free_port, one_thread, rank_environment
from test_train_checkpoint import STEPS, _spawn, data_file, losses, overrides, uninterrupted  # noqa: F401
from test_train_equivalence import CFG, DENSE, MOE, MICRO, Reference, dataset

from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.distributed.parallel import shutdown
from pp_runtime.jobs.config import load_config
from pp_runtime.model.partition import plan_for
from pp_runtime.training import checkpoint as tc
from pp_runtime.training.schedules import build_schedule
from pp_runtime.training.trainer import TrainConfig, Trainer

N_STEPS = 3


def _trainer(ctx, args, name: str, pp: int, dtype: torch.dtype, **cfg) -> Trainer:
    data = dataset(args)
    schedule = build_schedule(name, pp, MICRO, 1)
    plan = plan_for(args, pp, training=True, stage_ranks=schedule.stage_ranks)
    source = ModelSource(args, None, seed=3)
    stages = {s.index: source.build_stage(s, dtype, ctx.device) for s in plan.for_rank(ctx.pp_rank)}
    return Trainer(ctx, args, schedule, stages, data, TrainConfig(**{**CFG.__dict__, **cfg}), console=False)


def zero_case(ctx, name: str, pp: int, args) -> None:
    """ZeRO-1 in float64 == the single-process reference (loss, norm, weights)."""
    trainer = _trainer(ctx, args, name, pp, torch.float64, zero=1)
    assert trainer.flat is not None and trainer.flat.zero
    L = trainer.flat.layout
    assert trainer.flat.master.numel() == L.shard_numel == math.ceil(L.numel / ctx.dp_size)  # only its share
    ref = Reference(args, dataset(args), trainer.cfg, seed=3)
    label = f"zero {name} pp={pp} dp={ctx.dp_size} rank={ctx.rank}"
    for step in range(N_STEPS):
        stats = trainer.step()
        ref_loss, ref_norm, _ = ref.step()
        assert math.isclose(stats.loss, ref_loss, rel_tol=1e-9), f"{label} step {step}: loss {stats.loss} vs {ref_loss}"
        assert math.isclose(stats.grad_norm, ref_norm, rel_tol=1e-9), f"{label} step {step}: norm {stats.grad_norm} vs {ref_norm}"
        assert ref_norm > CFG.grad_clip  # clipping is exercised
    ref_params = dict(ref.model.named_parameters())
    for n, p in trainer.named_params:
        torch.testing.assert_close(p.detach(), ref_params[n].detach(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=n: f"{label}: weight {n} after {N_STEPS} steps: {m}")
    # the checkpoint view: full tensors, gathered on replica 0 only
    weights, optim = trainer.weights_of_record(), trainer.optimizer_state()
    if ctx.dp_rank == 0:
        assert set(weights) == {n for n, _ in trainer.named_params}
        for n, p in trainer.named_params:
            torch.testing.assert_close(weights[n], p.detach(), rtol=0, atol=0)
            assert optim[f"{n}.exp_avg"].shape == p.shape and float(optim[f"{n}.step"]) == N_STEPS
            st = ref.opt.state[ref_params[n]]
            torch.testing.assert_close(optim[f"{n}.exp_avg_sq"], st["exp_avg_sq"], rtol=1e-9, atol=1e-15)
    else:
        assert weights == {} and optim == {}


def cpu_adam_case(ctx, name: str, pp: int, args, zero: int) -> None:
    """DeepSpeedCPUAdam (float32 master weights in host memory) == torch's AdamW within float32 rounding."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    off = _trainer(ctx, args, name, pp, torch.float32, optimizer="cpu_adam", zero=zero)
    plain = _trainer(ctx, args, name, pp, torch.float32)
    assert isinstance(off.optimizer, DeepSpeedCPUAdam) and off.flat.master.device.type == "cpu"
    label = f"cpu_adam zero={zero} {name} pp={pp} dp={ctx.dp_size} rank={ctx.rank}"
    for step in range(N_STEPS):
        a, b = off.step(), plain.step()
        assert math.isclose(a.loss, b.loss, rel_tol=1e-5), f"{label} step {step}: loss {a.loss} vs {b.loss}"
        assert math.isclose(a.grad_norm, b.grad_norm, rel_tol=1e-5), f"{label} step {step}: {a.grad_norm} vs {b.grad_norm}"
    steps = {int(st["step"]) for st in off.optimizer.state.values()}
    assert steps == {N_STEPS}, steps  # DeepSpeed's own step counter: its step() really ran
    theirs = dict(plain.named_params)
    for n, p in off.named_params:
        torch.testing.assert_close(p.detach(), theirs[n].detach(), rtol=1e-5, atol=2e-6,
                                   msg=lambda m, n=n: f"{label}: weight {n} after {N_STEPS} steps: {m}")


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    from pp_runtime.distributed.parallel import init_parallel

    rank_environment(rank, world, port)
    torch.set_num_threads(1)
    for kind, name, pp, dp, args, *extra in cases:
        ctx = init_parallel(pp, dp, "cpu")
        if kind == "zero":
            zero_case(ctx, name, pp, args)
        else:
            cpu_adam_case(ctx, name, pp, args, *extra)
    shutdown()


def _run(world: int, cases: list) -> None:
    mp.start_processes(_worker, args=(world, free_port(), cases), nprocs=world, join=True, start_method="fork")


@pytest.mark.timeout(600)  # the first use of DeepSpeed's CPU Adam builds its op (about 2 minutes on 2 cores)
def test_zero1_and_cpu_adam_on_two_stages_two_replicas():
    _run(4, [
        ("zero", "1f1b", 2, 2, DENSE),
        ("zero", "zb-h1", 2, 2, MOE),
        ("cpu_adam", "1f1b", 2, 2, DENSE, 1),  # offload and ZeRO-1 together: each replica's slice on the host
    ])


@pytest.mark.timeout(600)
def test_zero1_and_cpu_adam_on_one_stage_two_replicas():
    _run(2, [
        ("zero", "gpipe", 1, 2, MOE),
        ("cpu_adam", "1f1b", 1, 2, DENSE, 0),  # offload without ZeRO: gradients all-reduced, whole stage on the host
    ])


@pytest.mark.timeout(600)
def test_cpu_adam_matches_torch_adamw_in_one_process():
    from pp_runtime.distributed.parallel import init_parallel

    with one_thread():
        cpu_adam_case(init_parallel(1, 1, "cpu"), "1f1b", 1, DENSE, 0)


def test_cpu_adam_steps_on_the_process_share_of_cores(monkeypatch):
    """torchrun's default OMP_NUM_THREADS=1 must not leave the host step on one core: during DeepSpeed's
    step torch (whose OpenMP runtime the op shares) runs cores / local ranks threads, then goes back."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from pp_runtime.distributed import threads
    from pp_runtime.distributed.parallel import init_parallel

    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: 3 cores each
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it when the user set nothing
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    seen = []
    real_step = DeepSpeedCPUAdam.step
    monkeypatch.setattr(DeepSpeedCPUAdam, "step", lambda self, *a, **k: (seen.append(torch.get_num_threads()),
                                                                          real_step(self, *a, **k))[1])
    with one_thread():
        off = _trainer(init_parallel(1, 1, "cpu"), DENSE, "1f1b", 1, torch.float32, optimizer="cpu_adam")
        off.step()
        after = torch.get_num_threads()
    assert seen and set(seen) == {3}, seen
    assert after == 1


# --- kill -9 and resume through launch/finetune.py ---------------------------------------------------


@pytest.fixture(scope="module")
def zero_interrupted(data_file, tiny_ckpt, tmp_path_factory):  # noqa: F811
    """1 stage x 2 replicas with ZeRO-1; kill -9 rank 1 in step 5 (step 4 saved), then resume."""
    out = tmp_path_factory.mktemp("zero_interrupted")
    argv = overrides(data_file, tiny_ckpt, out, "pipeline.data_parallel=2", "train.zero=1", "checkpoint.keep=3")
    assert not _spawn(2, argv, kill=("in-step", 5, 1))
    assert [p.name for p in tc.list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert _spawn(2, argv)
    return out


@pytest.mark.timeout(240)
def test_zero1_kill_and_resume_gives_the_uninterrupted_loss_curve(zero_interrupted, uninterrupted):  # noqa: F811
    ref, got = losses(uninterrupted), losses(zero_interrupted)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:  # 2 replicas vs 1 process: equal up to float32 summation order
        assert got[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}: {got[step]} vs {ref[step]}"


@pytest.mark.timeout(120)
def test_zero1_checkpoint_resumes_under_another_replica_count(zero_interrupted, uninterrupted, data_file,  # noqa: F811
                                                              tiny_ckpt, tmp_path, capsys):
    """The step-4 checkpoint of 2 ZeRO replicas, resumed by one process (ZeRO-1 over 1 replica)."""
    from pp_runtime.jobs.finetune import run

    ckpt = zero_interrupted / "checkpoints" / "step_00000004"
    argv = overrides(data_file, tiny_ckpt, tmp_path, f"resume={ckpt}", "train.zero=1")
    with one_thread():
        assert run(load_config("finetune", argv)) == 0
    got, ref = losses(tmp_path), losses(uninterrupted)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    printed = capsys.readouterr().out
    assert "memory plan (estimated device bytes per pipeline rank; float32, adamw, schedule 1f1b)" in printed
    assert "note: train.zero=1 with one replica shards nothing" in printed


@pytest.mark.timeout(240)
def test_zero1_checkpoint_resumes_on_two_stages_of_two_replicas(zero_interrupted, uninterrupted, data_file,  # noqa: F811
                                                                tiny_ckpt, tmp_path):
    """The same checkpoint (1 stage x 2 replicas) under another split and layout: 2 stages x 2 replicas, 4 ranks."""
    ckpt = zero_interrupted / "checkpoints" / "step_00000004"
    argv = overrides(data_file, tiny_ckpt, tmp_path, f"resume={ckpt}", "pipeline.stages=2", "pipeline.data_parallel=2",
                     "train.zero=1")
    assert _spawn(4, argv)
    got, ref = losses(tmp_path), losses(uninterrupted)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    saved = tc.read_manifest(tc.latest_checkpoint(tmp_path / "checkpoints"))
    assert len(saved["stages"]) == 2 and saved["step"] == STEPS


@pytest.mark.timeout(300)
def test_cpu_adam_kill_and_resume_gives_the_uninterrupted_loss_curve(data_file, tiny_ckpt, uninterrupted,  # noqa: F811
                                                                    tmp_path):
    """One process with train.optimizer=cpu_adam, killed -9 in step 5, resumed: the plain run's curve
    (within float32 rounding: DeepSpeed's kernel against torch's AdamW)."""
    argv = overrides(data_file, tiny_ckpt, tmp_path, "train.optimizer=cpu_adam", "checkpoint.keep=3")
    assert not _spawn(1, argv, kill=("in-step", 5, 0))
    assert [p.name for p in tc.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert _spawn(1, argv)
    ref, got = losses(uninterrupted), losses(tmp_path)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}: {got[step]} vs {ref[step]}"


def test_cpu_adam_without_deepspeed_or_its_op_is_one_line(monkeypatch):
    """What a user without DeepSpeed (or without a compiler) gets: a one-line ConfigError at start-up."""
    import sys

    from deepspeed.ops.op_builder import CPUAdamBuilder

    from pp_runtime.errors import ConfigError
    from pp_runtime.training.cpu_offload import cpu_adam_class

    def broken(self, *a, **k):
        raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped")

    monkeypatch.setattr(CPUAdamBuilder, "load", broken)
    with pytest.raises(ConfigError, match=r"^train.optimizer=cpu_adam: DeepSpeed's CPU Adam op could not be built or "
                                          r"loaded \(RuntimeError: Error building extension 'cpu_adam'\); pip install"):
        cpu_adam_class()
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"^train.optimizer=cpu_adam needs DeepSpeed, which does not import here") as e:
        cpu_adam_class()
    assert "\n" not in str(e.value)
