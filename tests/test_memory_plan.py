"""The start-up memory plan: per-rank bytes against hand arithmetic, and the one-line refusal."""

from __future__ import annotations

import pytest
import torch

from dist_utils import one_thread
from test_train_checkpoint import data_file, overrides  # noqa: F401

from pp_runtime.errors import ConfigError
from pp_runtime.jobs.config import load_config
from pp_runtime.model.args import ModelArgs, MoeArgs
from pp_runtime.model.partition import plan_for
from pp_runtime.training.memory_plan import plan_memory
from pp_runtime.training.schedules import build_schedule

ARGS = ModelArgs(dim=32, n_layers=4, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
                 sliding_window=6, max_seq_len=64)
# by hand: wq 32x32, wk 16x32, wv 16x32, wo 32x32, w1/w2/w3 48x32, two norms of 32
LAYER = 1024 + 512 + 512 + 1024 + 3 * 1536 + 2 * 32  # 7744
STAGE0 = 64 * 32 + 2 * LAYER  # embedding + layers 0-1
STAGE1 = 2 * LAYER + 32 + 64 * 32  # layers 2-3 + norm + head
TOKENS = 64
ACT_LAYER = 2 * (6 * 32 + 2 * 16 + 4 * 48)  # bf16 bytes per token per layer: 832
ACT0 = TOKENS * 2 * ACT_LAYER
ACT1 = TOKENS * 2 * ACT_LAYER + TOKENS * 64 * (2 + 8)  # + logits, their float32 copy and gradient


def _plan(**kw):
    schedule = build_schedule("1f1b", 2, 4, 1)  # rank 0 holds 2 micro-batches at its peak, rank 1 one
    plan = plan_for(ARGS, 2, split=[2, 2], training=True, stage_ranks=schedule.stage_ranks)
    return plan_memory(ARGS, plan, schedule, dtype=torch.bfloat16, tokens_per_microbatch=TOKENS, **kw)


def test_plain_adamw_bf16_by_hand():
    r0, r1 = _plan().ranks
    assert (r0.params, r1.params) == (STAGE0, STAGE1) == (17536, 17568)
    assert (r0.peak_microbatches, r1.peak_microbatches) == (2, 1)
    assert r0.weights == STAGE0 * 2
    assert r0.grads == STAGE0 * 2 + STAGE0 * 4  # bf16 gradients + their float32 copies
    assert r0.optimizer == STAGE0 * 12  # float32 master + exp_avg + exp_avg_sq
    assert r0.activations == 2 * ACT0 and r1.activations == ACT1
    assert r0.total == STAGE0 * 20 + 2 * ACT0 and r0.host == 0


def test_zero1_cpu_adam_checkpointing_and_lora_counts_by_hand():
    z = _plan(dp_size=2, zero=True).ranks[0]
    assert z.optimizer == (STAGE0 // 2) * 12 and z.grads == STAGE0 * 2
    off = _plan(optimizer="cpu_adam").ranks[0]
    assert off.optimizer == STAGE0 * 2 and off.host == STAGE0 * (12 + 2) and off.grads == STAGE0 * 2
    both = _plan(optimizer="cpu_adam", zero=True, dp_size=4).ranks[0]
    assert both.host == (STAGE0 // 4) * 14 and both.optimizer == (STAGE0 // 4) * 2
    ckpt = _plan(activation_checkpointing=True).ranks
    assert ckpt[0].activations == 2 * TOKENS * (2 * 2 * 32 + ACT_LAYER)  # 2 layer inputs + one layer recomputed
    assert ckpt[1].activations == TOKENS * (2 * 2 * 32 + ACT_LAYER) + TOKENS * 64 * 10
    lora = _plan(trainable=[1000, 2000]).ranks  # only adapters train: grads and state follow them
    assert lora[0].weights == STAGE0 * 2 and lora[0].grads == 1000 * 6 and lora[0].optimizer == 1000 * 12
    f64 = plan_memory(ARGS, plan_for(ARGS, 1, training=True), build_schedule("gpipe", 1, 4, 1), dtype=torch.float64,
                      tokens_per_microbatch=TOKENS).ranks[0]
    assert f64.optimizer == (STAGE0 + STAGE1) * 16 and f64.peak_microbatches == 4  # no master: two float64 states


def test_moe_layer_activations_count_the_routed_experts():
    moe = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
                    sliding_window=6, max_seq_len=64, moe=MoeArgs(4, 2))
    schedule = build_schedule("gpipe", 1, 1, 1)
    r = plan_memory(moe, plan_for(moe, 1, training=True), schedule, dtype=torch.float32,
                    tokens_per_microbatch=10).ranks[0]
    per_layer = 4 * (6 * 32 + 2 * 16 + 4 * 48 * 2) + 4 * 4  # top-2 experts + the router's float32 logits
    assert r.activations == 10 * 2 * per_layer + 10 * 64 * (4 + 8)
    assert r.params == 64 * 32 * 2 + 2 * (3072 + 4 * 3 * 1536 + 4 * 32 + 64) + 32  # experts + gate per layer


def test_refusal_names_the_remedies_in_one_line():
    plan = _plan()
    plan.check(0, plan.ranks[0].total, pp_size=2, dp_size=1)  # fits exactly: fine
    with pytest.raises(ConfigError) as e:
        plan.check(0, plan.ranks[0].total - 1, pp_size=2, dp_size=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan: pipeline rank 0 (stage 0) needs an estimated")
    for remedy in ("train.lora.rank", "train.zero=1 with pipeline.data_parallel=2", "train.optimizer=cpu_adam",
                   "pipeline.stages=4", "train.memory_check=false"):
        assert remedy in msg, (remedy, msg)
    text = plan.describe()
    assert text.splitlines()[0].startswith("memory plan (estimated device bytes per pipeline rank; bfloat16, adamw")
    assert "rank 1 (stage 1): 0.02M params" in text


def test_finetune_refuses_before_training_when_a_rank_does_not_fit(data_file, tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """On GPU the job compares each rank's estimate with torch.cuda.mem_get_info; here a fake 1 MiB device."""
    from pp_runtime.jobs import finetune as finetune_job

    monkeypatch.setattr(finetune_job, "device_free_bytes", lambda device: 1 << 20)
    with one_thread(), pytest.raises(ConfigError, match=r"^memory plan: pipeline rank 0 \(stage 0\) needs an estimated .* "
                                                         r"but its GPU has 1\.0 MiB free; fit it with LoRA"):
        finetune_job.run(load_config("finetune", overrides(data_file, tiny_ckpt, tmp_path)))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step
    # the check can be switched off
    with one_thread():
        assert finetune_job.run(load_config("finetune", overrides(data_file, tiny_ckpt, tmp_path, "train.memory_check=false",
                                                                  "train.steps=1", "export=null"))) == 0
