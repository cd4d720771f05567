"""Varlen ring attention (Triton) against the padded SDPA path, Mistral-7B attention shapes, one GPU.

    python benchmarks/bench_attention.py [--no-check] [--sweep]

First checks the kernel against the SDPA path on random bf16 mixes (outputs and caches), then
times one layer's attention + cache write for decode, fresh prefill and a mixed step
(triton.testing.do_bench, median) and prints a table with achieved TFLOP/s and GB/s.
--sweep also times the attention kernel alone over a grid of tile configurations.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.inference import ring_attention as ra  # noqa: E402
from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.attention_meta import SeqChunk, build_inference_meta  # noqa: E402
from pp_runtime.model.kv_cache import LayerCacheView  # noqa: E402
from pp_runtime.model.transformer import Attention  # noqa: E402

ARGS = preset("mistral-7b")
H, HKV, D, W = ARGS.n_heads, ARGS.n_kv_heads, ARGS.head_dim, ARGS.sliding_window
G = H // HKV
CAP = W
DT = torch.bfloat16
DEV = "cuda"


def sdpa_step(attn: Attention, q, k, v, cache, meta):
    """The body of model.Attention.forward after RoPE: pad to rows, masked SDPA, scatter into the ring."""
    keys, values = LayerCacheView(*cache, meta.cache_access).update(k, v, meta.to_rows)
    return meta.from_rows(attn._sdpa(meta.to_rows(q), keys, values, meta.mask))


def kernel_step(q, k, v, cache, batch, num_splits=1, **cfg):
    out = ra.ring_attention(q, k, v, *cache, batch, window=W, scale=D**-0.5, num_splits=num_splits, **cfg)
    ra.ring_write(*cache, k, v, batch)
    return out


def make_step(chunks: list[SeqChunk], n_slots: int, block_m: int, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    t = sum(c.n_tokens for c in chunks)
    q = torch.randn(t, H, D, device=DEV, dtype=DT, generator=gen)
    k = torch.randn(t, HKV, D, device=DEV, dtype=DT, generator=gen)
    v = torch.randn(t, HKV, D, device=DEV, dtype=DT, generator=gen)
    cache = [torch.randn(n_slots, CAP, HKV, D, device=DEV, dtype=DT, generator=gen) for _ in range(2)]
    meta = build_inference_meta(chunks, capacity=CAP, window=W, head_dim=D, rope_theta=ARGS.rope_theta,
                                n_kv_groups=G, device=DEV)
    return q, k, v, cache, meta, plan(chunks, block_m)


def plan(chunks: list[SeqChunk], block_m: int) -> ra.VarlenBatch:
    layout = ra.VarlenLayout.for_tokens(sum(c.n_tokens for c in chunks), len(chunks), block_m)
    return ra.plan_varlen([c.slot for c in chunks], [c.start for c in chunks], [c.n_tokens for c in chunks],
                          max_seqs=layout.max_seqs, max_blocks=layout.max_blocks, block_m=block_m, device=DEV)


def check(attn: Attention) -> None:
    rng = random.Random(0)
    for trial in range(4):
        n = rng.randint(1, 12)
        chunks = []
        for i in range(n):
            length = 1 if rng.random() < 0.5 else rng.randint(2, 700)
            chunks.append(SeqChunk(i, rng.choice([0, rng.randint(0, 3 * CAP)]), length))
        block_m = ra.default_block_m(G, decode_only=all(c.n_tokens == 1 for c in chunks))
        q, k, v, cache, meta, batch = make_step(chunks, n, block_m, seed=trial)
        ref_cache = [c.clone() for c in cache]
        want = sdpa_step(attn, q, k, v, ref_cache, meta).float()
        for splits in (1, 4):
            got_cache = [c.clone() for c in cache]
            got = kernel_step(q, k, v, got_cache, batch, num_splits=splits).float()
            err = (got - want).abs().max().item()
            assert err < 3e-2, f"mix {trial} splits {splits}: max |kernel - sdpa| = {err}"
            assert all(torch.equal(a, b) for a, b in zip(got_cache, ref_cache)), f"mix {trial}: caches differ"
        print(f"check mix {trial}: {n} seqs, {q.shape[0]} tokens, max |kernel - sdpa| {err:.2e}, caches equal")


def work(chunks: list[SeqChunk]) -> tuple[float, float]:
    """FLOPs (QK^T and PV over the visible keys) and unique bytes (ring and new K/V, q, out, K/V written)."""
    flops = bytes_ = 0.0
    for c in chunks:
        p = torch.arange(c.start, c.start + c.n_tokens)
        oldest = torch.clamp(torch.maximum(p - W + 1, torch.tensor(c.start - CAP)), min=0)
        flops += 4 * D * H * float((p - oldest + 1).sum())
        ring = c.start - max(0, c.start - CAP, c.start - W + 1)
        bytes_ += 2 * (ring + 2 * c.n_tokens) * HKV * D * 2 + 2 * c.n_tokens * H * D * 2
    return flops, bytes_


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def report(name: str, label: str, fn, flops: float, bytes_: float) -> None:
    try:
        ms = bench(fn)
        print(f"{name:<28} {label:<26} {ms * 1e3:>9.1f} {flops / ms / 1e9:>8.1f} {bytes_ / ms / 1e6:>7.0f}", flush=True)
    except RuntimeError as e:  # the padded path can run out of memory on long mixes
        print(f"{name:<28} {label:<26} {'failed':>9} {type(e).__name__}: {str(e)[:60]}", flush=True)
    torch.cuda.empty_cache()


def run_case(name: str, attn: Attention, chunks: list[SeqChunk], decode: bool, sweep: bool) -> None:
    flops, bytes_ = work(chunks)
    block_m = ra.default_block_m(G, decode_only=decode)
    q, k, v, cache, meta, batch = make_step(chunks, len(chunks), block_m)
    report(name, "triton", lambda: kernel_step(q, k, v, cache, batch), flops, bytes_)
    splits = ra.decode_splits(len(chunks), HKV, max(c.start for c in chunks)) if decode else 1
    if splits > 1:
        report(name, f"triton split{splits}", lambda: kernel_step(q, k, v, cache, batch, num_splits=splits),
               flops, bytes_)
    if sweep:  # tile rows x key tile x warps x stages, attention only
        for rows, bn, warps, stages in itertools.product((16, 64, 128), (32, 64, 128), (4, 8), (2, 3)):
            tiles = plan(chunks, rows // G)
            report(name, f"rows{rows} n{bn} w{warps} s{stages} x{splits}", lambda: ra.ring_attention(
                q, k, v, *cache, tiles, window=W, num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages),
                flops, bytes_)
    report(name, "sdpa padded", lambda: sdpa_step(attn, q, k, v, cache, meta), flops, bytes_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile configurations")
    opts = parser.parse_args()
    attn = Attention(ARGS).to(DEV, DT)  # only its SDPA helper is used; the weights stay untouched
    torch.manual_seed(0)
    if not opts.no_check:
        check(attn)
    print(f"{'case':<28} {'path':<26} {'us':>9} {'TFLOP/s':>8} {'GB/s':>7}")
    for b in (1, 64):
        for ctx in (4096, 128):
            run_case(f"decode B={b} ctx={ctx}", attn, [SeqChunk(i, ctx, 1) for i in range(b)], True, opts.sweep)
    run_case("prefill 1x4096", attn, [SeqChunk(0, 0, 4096)], False, opts.sweep)
    run_case("prefill 8x1024", attn, [SeqChunk(i, 0, 1024) for i in range(8)], False, opts.sweep)
    mix = [SeqChunk(0, 0, 4096)] + [SeqChunk(i, 4096, 1) for i in range(1, 64)]
    run_case("mix 4096 + 63 decode@4096", attn, mix, False, opts.sweep)


if __name__ == "__main__":
    main()
