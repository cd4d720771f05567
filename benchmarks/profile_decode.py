"""Where one decode step's time goes: host work per step and the GPU kernels, on one GPU.

    python benchmarks/profile_decode.py --ckpt DIR --batch 64 [--steps 20] [--trace trace.json]

Runs the engine's decode (128-token prompts) under torch.profiler and prints the kernels by GPU
time, then the host's share: wall time per step against the GPU's busy time per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_infer import random_requests  # noqa: E402
from pp_runtime.checkpoints.model_source import ModelSource  # noqa: E402
from pp_runtime.distributed.parallel import init_parallel  # noqa: E402
from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline  # noqa: E402
from pp_runtime.model.partition import plan_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trace", default=None)
    a = p.parse_args()
    ctx = init_parallel(device="cuda")
    source = ModelSource.from_path(a.ckpt)
    args = source.args
    module = source.build_stage(plan_for(args, 1).stages[0], torch.bfloat16, ctx.device)
    cfg = InferenceConfig(microbatches=1, batch_size=a.batch, max_batch_tokens=4096).resolved(args, 1)
    runner = StageRunner(args, module, cfg, ctx.device, torch.bfloat16)
    run_pipeline(ctx, runner, iter(random_requests(a.batch, 128, 8, args.vocab_size, 1)))  # capture
    reqs = random_requests(a.batch, 128, a.steps, args.vocab_size)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        _, st = run_pipeline(ctx, runner, iter(reqs))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    steps = a.steps + 1  # the prefill step and the decode steps
    print(f"B={a.batch}: wall {1e3 * wall / steps:.2f} ms/step, GPU kernels {gpu_us / 1e3 / steps:.2f} ms/step, "
          f"decode {1e3 * st.decode_s / max(st.decode_steps, 1):.2f} ms/step (profiler on)")
    if a.trace:
        prof.export_chrome_trace(a.trace)
    os._exit(0)


if __name__ == "__main__":
    main()
