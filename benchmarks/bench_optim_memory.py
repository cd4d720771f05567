"""Optimizer placement benchmark: plain AdamW, ZeRO-1 and DeepSpeed's CPU-offloaded AdamW on the same
model, batch and pipeline; tokens/s, peak memory per GPU, and the memory plan's estimate against it.

    # 2 GPUs: Mistral-7B shape on 2 stages, all on the GPU against cpu_adam (needs the deepspeed extra)
    torchrun --nproc_per_node=2 benchmarks/bench_optim_memory.py --stages 2 --configs plain,cpu_adam
    # 4 GPUs: 2 stages x 2 replicas, plain against ZeRO-1
    torchrun --nproc_per_node=4 benchmarks/bench_optim_memory.py --stages 2 --dp 2 --configs plain,zero
    # CPU smoke run
    torchrun --nproc_per_node=2 benchmarks/bench_optim_memory.py --dp 2 --dim 64 --layers 2 --hidden 128 \\
        --heads 4 --kv-heads 2 --head-dim 16 --vocab 256 --seq 32 --steps 2 --warmup 1 --configs plain,zero,cpu_adam

Every configuration builds the model afresh (seeded weights, bf16 on GPU with float32 master
weights, float32 on CPU), runs `--warmup` untimed then `--steps` timed steps of `--microbatches`
rows of `--seq` tokens per replica (one row per micro-batch, the 1F1B schedule), and reports, per
pipeline rank (replica 0), `torch.cuda.max_memory_allocated` over the configuration (weights
included) and the plan's total (`pp_runtime/training/memory_plan.py`), with their ratio.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.distributed as dist

from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.distributed.parallel import init_parallel, shutdown
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.partition import plan_for
from pp_runtime.training.data import Document, PackedDataset
from pp_runtime.training.memory_plan import plan_memory
from pp_runtime.training.schedules import build_schedule
from pp_runtime.training.trainer import TrainConfig, Trainer

CONFIGS = {"plain": {}, "zero": {"zero": 1}, "cpu_adam": {"optimizer": "cpu_adam"},
           "cpu_adam+zero": {"optimizer": "cpu_adam", "zero": 1}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=None)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--configs", default="plain,zero,cpu_adam")
    a = p.parse_args()
    ctx = init_parallel(a.stages, a.dp, "auto")
    cuda = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    args = ModelArgs(dim=a.dim, n_layers=a.layers, head_dim=a.head_dim, hidden_dim=a.hidden, n_heads=a.heads,
                     n_kv_heads=a.kv_heads, vocab_size=a.vocab, sliding_window=a.seq, max_seq_len=a.seq)
    rng = random.Random(0)
    rows = a.microbatches * ctx.dp_size * (a.steps + a.warmup)
    docs = [Document([rng.randrange(3, a.vocab) for _ in range(a.seq)], [True] * a.seq) for _ in range(rows)]
    data = PackedDataset.from_documents(docs, a.seq, pad_id=2, shuffle=False)
    schedule = build_schedule("1f1b", ctx.pp_size, a.microbatches, 1)
    plan = plan_for(args, ctx.pp_size, training=True, stage_ranks=schedule.stage_ranks)
    for name in a.configs.split(","):
        kw = CONFIGS[name]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        src = ModelSource(args, None, seed=0)
        stages = {s.index: src.build_stage(s, dtype, ctx.device) for s in plan.for_rank(ctx.pp_rank)}
        cfg = TrainConfig(steps=a.steps + a.warmup, batch_size=a.microbatches * ctx.dp_size, lr=1e-5, min_lr=1e-6,
                          warmup_steps=0, activation_checkpointing=a.activation_checkpointing, **kw)
        trainer = Trainer(ctx, args, schedule, stages, data, cfg, console=False)
        for _ in range(a.warmup):
            trainer.step()
        if ctx.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            stats = trainer.step()
        dt = time.perf_counter() - t0
        tps = a.steps * cfg.batch_size * a.seq / dt
        peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else 0
        est = plan_memory(args, plan, schedule, dtype=dtype, tokens_per_microbatch=a.seq, dp_size=ctx.dp_size,
                          zero=bool(kw.get("zero")), optimizer=kw.get("optimizer", "adamw"),
                          activation_checkpointing=a.activation_checkpointing).ranks[ctx.pp_rank]
        found: list = [None] * ctx.world_size
        mine = (ctx.pp_rank, peak, est.total, est.host)
        if ctx.distributed:
            dist.all_gather_object(found, mine)
        else:
            found = [mine]
        if ctx.rank == 0:
            print(f"{name}: {tps:,.0f} tokens/s (loss {stats.loss:.4f}, {dt / a.steps:.3f} s/step)", flush=True)
            for r, pk, total, host in found[:ctx.pp_size]:
                ratio = f", estimate/measured {total / pk:.3f}" if pk else ""
                print(f"  pipeline rank {r}: peak {pk / 2**30:.2f} GiB, plan {total / 2**30:.2f} GiB{ratio}"
                      + (f", host {host / 2**30:.2f} GiB" if host else ""), flush=True)
        del trainer, stages
    shutdown()


if __name__ == "__main__":
    main()
