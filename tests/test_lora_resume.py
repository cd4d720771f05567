"""LoRA runs stop and resume like full fine-tunes: kill -9 mid-step on 2 stages, resume, and the loss
curve is the uninterrupted one; the adapter checkpoint resumes under another split; a changed LoRA
setting is another run; dropout on the adapters is reproduced by activation checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pp_runtime.errors import CheckpointError
from pp_runtime.jobs.config import load_config
from pp_runtime.training import checkpoint as tc
from dist_utils import in_one_thread
from test_lora_export import data_file  # noqa: F401,F811 - data_file: the fixture
from test_train_checkpoint import _spawn, losses

STEPS = 4


def argv(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={ckpt}", f"data.path={data}", "data.seq_len=24", f"out_dir={out}", f"train.steps={STEPS}",
            "train.batch_size=4", "train.warmup_steps=1", "train.lr=2e-2", "schedule.microbatches=2", "device=cpu",
            "model.dtype=float32", "checkpoint.every=2", "train.lora.rank=4", "train.lora.targets=[wq,wv,w2]", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, data_file, tmp_path_factory) -> Path:  # noqa: F811
    from pp_runtime.jobs.finetune import run

    out = tmp_path_factory.mktemp("lora_whole")
    assert in_one_thread(run, load_config("finetune", argv(tiny_ckpt, data_file, out, "export=null"))) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(tiny_ckpt, data_file, tmp_path_factory) -> Path:  # noqa: F811
    """2 stages, kill -9 of rank 1 in the middle of step 3 (step 2 saved), then resumed to the end with a
    PEFT export (export settings are not part of the run)."""
    out = tmp_path_factory.mktemp("lora_killed")
    args = argv(tiny_ckpt, data_file, out)
    assert not _spawn(2, args, kill=("in-step", 3, 1))
    assert [p.name for p in tc.list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert _spawn(2, args + ["export_format=peft"])
    return out


@pytest.mark.timeout(240)
def test_kill_and_resume_continues_the_loss_curve(uninterrupted, interrupted):
    ref, got = losses(uninterrupted), losses(interrupted)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:  # 2 stages vs 1 process: equal up to float32 summation order
        assert got[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}: {got[step]} vs {ref[step]}"
    assert ref[STEPS] < ref[1]
    peft = interrupted / "export"
    assert {p.name for p in peft.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((peft / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj", "down_proj"]


@pytest.mark.timeout(120)
def test_adapter_checkpoint_resumes_under_another_split(interrupted, uninterrupted, tiny_ckpt, data_file,  # noqa: F811
                                                       tmp_path):
    from pp_runtime.jobs.finetune import run

    step2 = interrupted / "checkpoints" / "step_00000002"
    assert len(tc.read_manifest(step2)["stages"]) == 2
    assert in_one_thread(run, load_config("finetune", argv(tiny_ckpt, data_file, tmp_path, f"resume={step2}",
                                                         "export=null"))) == 0
    got, ref = losses(tmp_path), losses(uninterrupted)
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


@pytest.mark.parametrize("change, shown", [
    ("train.lora.rank=8", "train.lora: checkpoint rank 4, alpha 8.0, dropout 0.0, targets ['wq', 'wv', 'w2'], seed 0 "
                          "vs now rank 8, alpha 16.0,"),
    ("train.lora.rank=0", "train.lora: checkpoint rank 4, alpha 8.0, dropout 0.0, targets ['wq', 'wv', 'w2'], seed 0 "
                          "vs now None"),
])
def test_a_changed_lora_setting_is_another_run(change, shown, uninterrupted, tiny_ckpt, data_file, tmp_path):  # noqa: F811
    import shutil

    from pp_runtime.jobs.finetune import run

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="holds another run") as err:
        in_one_thread(run, load_config("finetune", argv(tiny_ckpt, data_file, tmp_path, change, "train.steps=6")))
    assert shown in str(err.value)


def test_dropout_is_reproduced_by_activation_checkpointing():
    """The recomputed forward draws the same dropout masks: the same gradients as without recomputation,
    and different ones from dropout 0 (the masks do apply); eval mode has no dropout."""
    from pp_runtime.checkpoints.formats import full_spec
    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.model.args import preset
    from pp_runtime.model.attention_meta import build_training_meta
    from pp_runtime.training.lora import LoraConfig, apply_lora

    args = preset("tiny", vocab_size=64)
    meta = build_training_meta([[12, 8]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    tokens = torch.arange(20) % 64

    def grads(dropout: float, checkpointing: bool, train: bool = True):
        model = ModelSource(args, None, 1).build_stage(full_spec(args), torch.float64, torch.device("cpu"))
        apply_lora(model, LoraConfig(4, 8.0, dropout, ("wq", "w1")))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train(train)
        model.activation_checkpointing = checkpointing
        torch.manual_seed(0)
        model(tokens, meta, logits="all").logsumexp(-1).sum().backward()
        return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    with_ckpt, without = in_one_thread(grads, 0.5, True), in_one_thread(grads, 0.5, False)
    torch.testing.assert_close(with_ckpt, without, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(without, grads(0.0, False))
    torch.testing.assert_close(grads(0.5, False, train=False), grads(0.0, False, train=False), rtol=0, atol=0)


def test_resuming_adapters_of_another_rank_deliberately_is_a_clear_error(uninterrupted, tiny_ckpt, data_file,  # noqa: F811
                                                                         tmp_path):
    from pp_runtime.jobs.finetune import run

    step = uninterrupted / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match=r"holds layers\.0\.attention\.wq\.lora_A\.weight of shape \[4, 64\] but "
                                              r"this run's is \[8, 64\]: resume it with its own train\.lora\.rank"):
        in_one_thread(run, load_config("finetune", argv(tiny_ckpt, data_file, tmp_path, f"resume={step}",
                                                     "train.lora.rank=8", "train.steps=6")))
