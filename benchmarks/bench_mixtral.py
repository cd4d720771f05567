"""Mixtral-8x7B-shaped random weights: our pipeline over the GPUs of one host against transformers'
MixtralForCausalLM on ONE GPU, default cache settings (the ring is sized from free memory).

    torchrun --nproc_per_node=2 benchmarks/bench_mixtral.py ours --prompts FILE --tokenizer tokenizer.model
    python benchmarks/bench_mixtral.py peer --prompts FILE --tokenizer tokenizer.model

Weights are drawn on each GPU (no 87 GB checkpoint on disk). `ours` measures decode B=1 and B=64
(64 sequences in all: 2 micro-batches of 32 on 2 stages) and the prompt file with 64 new tokens;
`peer` measures `generate` with the static cache (compiled) at B=1 and B=64 and `generate_batch`
over the same file. Both print `RESULT {json}` lines; ratios go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_infer import emit, file_prompts, peer_batch, peer_decode, random_requests, sync  # noqa: E402
from pp_runtime.checkpoints.model_source import ModelSource  # noqa: E402
from pp_runtime.distributed.parallel import init_parallel, shutdown  # noqa: E402
from pp_runtime.inference.batching import Request  # noqa: E402
from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline  # noqa: E402
from pp_runtime.inference.sampling import SamplingParams  # noqa: E402
from pp_runtime.io.tokenizer import Tokenizer  # noqa: E402
from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.partition import plan_for  # noqa: E402


def ours(a) -> None:
    ctx = init_parallel(device="auto")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    args = preset(a.preset)
    source = ModelSource(args, None, seed=0)
    t = time.perf_counter()
    module = source.build_stage(plan_for(args, ctx.pp_size).stages[ctx.pp_rank], dtype, ctx.device)
    sync()
    if ctx.rank == 0:
        emit("ours_load", seconds=round(time.perf_counter() - t, 1), stages=ctx.pp_size)

    def run(batch: int, mbs: int, reqs: list[Request], warm: list[Request]):
        cfg = InferenceConfig(microbatches=mbs, batch_size=batch, max_batch_tokens=4096).resolved(args, ctx.pp_size)
        runner = StageRunner(args, module, cfg, ctx.device, dtype)
        run_pipeline(ctx, runner, iter(warm) if ctx.is_first else None)
        _, st = run_pipeline(ctx, runner, iter(reqs) if ctx.is_first else None)
        cache = runner.describe_cache()
        del runner
        torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
        return st, cache

    for total, mbs in ((1, 1), (64, 2)):
        batch = total // mbs
        st, cache = run(batch, mbs, random_requests(total, 128, a.decode_new, args.vocab_size),
                        random_requests(total, 16, 4, args.vocab_size, 1))
        if ctx.rank == 0:
            ms = 1e3 * st.decode_s / max(st.decode_steps, 1)
            emit(f"ours_decode_b{total}", tok_s=round(st.decode_tokens / st.decode_s, 1), ms_per_step=round(ms, 3),
                 microbatches=mbs, busy=[round(b, 3) for b in st.busy_fraction], cache=cache, graphs=st.graphs)
    prompts = file_prompts(a.prompts, _tokenizer(a.tokenizer))
    reqs = [Request(i, i, "", p, a.max_new, SamplingParams()) for i, p in enumerate(prompts)]
    st, cache = run(64, 0, reqs, random_requests(8, 16, 4, args.vocab_size, 1))
    if ctx.rank == 0:
        total = st.prompt_tokens + st.generated_tokens
        emit("ours_batch", tok_s=round(total / st.wall_s, 1), wall_s=round(st.wall_s, 2), prompt_tokens=st.prompt_tokens,
             generated_tokens=st.generated_tokens, busy=[round(b, 3) for b in st.busy_fraction], cache=cache)
    shutdown()


def _tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    return Tokenizer.from_dir(p.parent if p.is_file() else p)


def peer(a) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = preset(a.preset)
    cfg = MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                        vocab_size=args.vocab_size, sliding_window=args.sliding_window, rope_theta=args.rope_theta,
                        max_position_embeddings=args.max_seq_len, num_local_experts=args.moe.num_experts,
                        num_experts_per_tok=args.moe.num_experts_per_tok)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t = time.perf_counter()
    torch.set_default_dtype(dtype)  # build in bf16 directly: a float32 copy of 46.7B parameters would not fit
    with torch.device(dev):
        model = MixtralForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    sync()
    emit("peer_load", seconds=round(time.perf_counter() - t, 1))
    peer_decode(model, args.vocab_size, dev, a.decode_new)
    peer_batch(model, file_prompts(a.prompts, _tokenizer(a.tokenizer)), a.max_new)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ours", "peer"])
    p.add_argument("--prompts", required=True)
    p.add_argument("--tokenizer", required=True, help="a sentencepiece tokenizer.model (or its folder)")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--decode-new", type=int, default=64)
    a = p.parse_args()
    ours(a) if a.mode == "ours" else peer(a)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
