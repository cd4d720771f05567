"""Inference benchmarks on GPU: prefill and decode of one stage, pipelined decode, and the HF baseline.

    python benchmarks/bench_infer.py single --ckpt DIR            # one GPU: floor, prefill, decode, HF
    torchrun --nproc_per_node=2 benchmarks/bench_infer.py pipeline --ckpt DIR   # stages = world size
    python benchmarks/bench_infer.py stage1 --ckpt DIR            # the same decode runs on one GPU

Each prints one JSON object per measurement (prefixed `RESULT`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.attention_meta import SeqChunk  # noqa: E402
from pp_runtime.engine import InferenceConfig, StageRunner, run_pipeline  # noqa: E402
from pp_runtime.parallel import init_parallel  # noqa: E402
from pp_runtime.partition import plan_for  # noqa: E402
from pp_runtime.runtime import ModelSource  # noqa: E402
from pp_runtime.sampling import SamplingParams  # noqa: E402
from pp_runtime.scheduler import Request  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def copy_bandwidth(device) -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)  # bytes read + written per second


def requests(n: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(i, i, "", [1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)], max_new, SamplingParams())
            for i in range(n)]


def build(ckpt: str, ctx, dtype, cfg: InferenceConfig):
    source = ModelSource.from_config({"path": ckpt})
    spec = plan_for(source.args, ctx.pp_size).stages[ctx.pp_rank]
    module = source.build_stage(spec, dtype, ctx.device)
    return source.args, module, StageRunner(source.args, module, cfg.resolved(source.args, ctx.pp_size), ctx.device, dtype)


def decode_run(ctx, args, module, dtype, batch: int, mbs: int, prompt_len: int, max_new: int, n_prompts: int,
               graphs: bool = True):
    cfg = InferenceConfig(microbatches=mbs, batch_size=batch, max_batch_tokens=max(4096, batch),
                          cuda_graphs=graphs).resolved(args, ctx.pp_size)
    runner = StageRunner(args, module, cfg, ctx.device, dtype)
    reqs = iter(requests(n_prompts, prompt_len, max_new, args.vocab_size)) if ctx.is_first else None
    run_pipeline(ctx, runner, iter(requests(mbs * batch, 16, 4, args.vocab_size, 1)) if ctx.is_first else None)  # warm-up
    sync()
    comps, stats = run_pipeline(ctx, runner, reqs)
    del runner
    sync()
    return comps, stats


def cmd_single(a) -> None:
    ctx = init_parallel(device="auto")
    dtype = torch.bfloat16
    t = time.perf_counter()
    args, module, runner = build(a.ckpt, ctx, dtype, InferenceConfig(microbatches=1, batch_size=8))
    sync()
    load_s = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    bw = copy_bandwidth(ctx.device) if ctx.device.type == "cuda" else 1e12
    emit(what="load", seconds=round(load_s, 1), weight_gb=round(weight_bytes / 1e9, 2),
         copy_tb_s=round(bw / 1e12, 2), decode_floor_ms=round(1e3 * weight_bytes / (bw / 2), 2))
    # prefill: one forward over packed chunks, timed after warm-up
    for rows, length in ((1, 4096), (8, 1024)):
        chunks = [SeqChunk(slot=i, start=0, n_tokens=length) for i in range(rows)]
        x = torch.randint(3, args.vocab_size, (rows * length,), device=ctx.device)
        for _ in range(2):
            runner.forward(x, chunks)
        sync()
        t = time.perf_counter()
        n = 5
        for _ in range(n):
            runner.forward(x, chunks)
        sync()
        dt = (time.perf_counter() - t) / n
        emit(what="prefill", rows=rows, length=length, tok_s=round(rows * length / dt), ms=round(1e3 * dt, 1))
    del runner
    for graphs in (False, True):
        for batch in (1, 64):
            _, st = decode_run(ctx, args, module, dtype, batch, 1, 128, 128, batch, graphs)
            emit(what="decode", stages=1, batch=batch, cuda_graphs=graphs,
                 ms_per_step=round(1e3 * st.decode_s / max(st.decode_steps, 1), 2),
                 tok_s=round(st.decode_tokens / st.decode_s, 1))
    del module
    sync()
    hf_baseline(a, args, ctx.device)


def hf_baseline(a, args, device) -> None:
    """transformers' generate on the same shape, random weights, same GPU: the peer's per-step time."""
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        emit(what="hf", error="transformers not installed")
        return
    cfg = MistralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                        vocab_size=args.vocab_size, sliding_window=args.sliding_window, rope_theta=args.rope_theta,
                        max_position_embeddings=args.max_seq_len)
    with torch.device(device):
        model = MistralForCausalLM(cfg).to(torch.bfloat16).eval()
    for batch in (1, 64):
        ids = torch.randint(3, args.vocab_size, (batch, 128), device=device)
        gen = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        sync()
        t = time.perf_counter()
        model.generate(ids, **gen)
        sync()
        dt = time.perf_counter() - t
        emit(what="hf_generate", batch=batch, ms_per_step=round(1e3 * dt / 128, 2), tok_s=round(batch * 128 / dt, 1),
             note="includes the 128-token prefill")


def cmd_decode(a, stages_label: str) -> None:
    """Decode throughput per micro-batch batch size; first rank reports. Also a float32 greedy dump."""
    ctx = init_parallel(device="auto")
    dtype = torch.bfloat16
    args, module, _ = build(a.ckpt, ctx, dtype, InferenceConfig(microbatches=1, batch_size=1))
    mbs = a.microbatches or ctx.pp_size
    for batch in a.batches:
        _, st = decode_run(ctx, args, module, dtype, batch, mbs, a.prompt_len, a.max_new, mbs * batch * a.waves,
                           not a.eager)
        if ctx.rank == 0:
            emit(what="decode", stages=ctx.pp_size, microbatches=mbs, batch=batch, cuda_graphs=not a.eager,
                 tok_s=round(st.decode_tokens / st.decode_s, 1),
                 ms_per_step=round(1e3 * st.decode_s / max(st.decode_steps, 1), 2),
                 busy=[round(b, 3) for b in st.busy_fraction], generated=st.generated_tokens, wall_s=round(st.wall_s, 2))
    del module
    sync()
    if a.greedy_out:
        _, module32, _ = build(a.ckpt, ctx, torch.float32, InferenceConfig(microbatches=1, batch_size=1))
        comps, _ = decode_run(ctx, args, module32, torch.float32, 4, mbs, 300, 32, 8, not a.eager)
        if ctx.rank == 0:
            Path(a.greedy_out).write_text(json.dumps({c.request.uid: c.tokens for c in comps}, sort_keys=True))
            emit(what="greedy_dump", stages=ctx.pp_size, path=a.greedy_out, n=len(comps))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["single", "pipeline", "stage1"])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--microbatches", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--waves", type=int, default=1, help="prompts = microbatches x batch x waves")
    p.add_argument("--greedy-out", default=None)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    a = p.parse_args()
    if a.mode == "single":
        cmd_single(a)
    else:
        cmd_decode(a, a.mode)
    os._exit(0)


if __name__ == "__main__":
    main()
