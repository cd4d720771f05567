"""The varlen ring-attention kernels (Triton interpreter on CPU) against float64 references.

Every cache entry that no query may see, every unused slot and every padding token is NaN, so a
kernel that reads one, or lets a padding token leak into a real one, fails the comparison.
"""

from __future__ import annotations

import os

# Read when Triton's own library and our kernels are defined, so it must be set before triton is
# first imported in this process; kernels then run on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language.standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from pp_runtime.inference import ring_attention as ra  # noqa: E402
from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.attention_meta import SeqChunk, build_inference_meta  # noqa: E402
from pp_runtime.model.kv_cache import LayerCacheView  # noqa: E402
from pp_runtime.model.transformer import Attention, apply_rope  # noqa: E402

NAN = float("nan")


def test_kernels_run_in_the_interpreter():
    """Guards the switch above: had triton been imported earlier in this process, kernels would need a GPU."""
    for fn in (triton.language.standard.zeros, ra._ring_attn_kernel):
        assert isinstance(fn, InterpretedFunction), "set TRITON_INTERPRET=1 before triton is first imported"


def reference_attention(q, k, v, cache_k, cache_v, slots, starts, lens, window: Optional[int], scale: float):
    """Per-sequence float64 attention from the definition: the visible ring entries, then the new tokens."""
    t, h, d = q.shape
    g = h // k.shape[1]
    cap = cache_k.shape[1]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    off = 0
    for slot, start, n in zip(slots, starts, lens):
        oldest = max(0, start - cap, start - window + 1 if window is not None else 0)
        ring = torch.arange(oldest, start)
        k_pos = torch.cat([ring, torch.arange(start, start + n)])
        keys = torch.cat([cache_k[slot, ring % cap], k[off : off + n]]).double().repeat_interleave(g, 1)
        values = torch.cat([cache_v[slot, ring % cap], v[off : off + n]]).double().repeat_interleave(g, 1)
        q_pos = torch.arange(start, start + n)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= q_pos[:, None] - k_pos[None, :] < window
        scores = torch.einsum("qhd,khd->hqk", q[off : off + n].double(), keys) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[off : off + n] = torch.einsum("hqk,khd->qhd", probs, values)
        off += n
    return out


def _mix(rng: random.Random, n_seqs: int, cap: int, window: Optional[int], max_len: int, max_start: int,
         decode_only: bool = False):
    """Random slots, starts and lengths: a mix of decode tokens and chunks, rings wrapped up to max_start/cap times."""
    slots = rng.sample(range(n_seqs + 2), n_seqs)  # two slots stay unused (poisoned)
    lens, starts = [], []
    for _ in range(n_seqs):
        n = 1 if decode_only or rng.random() < 0.4 else rng.randint(2, max_len)
        limit = max_start if window is not None else cap - n  # without a window the ring must hold everything
        lens.append(n)
        starts.append(rng.randint(0, limit))
    return slots, starts, lens


def _tensors(gen: torch.Generator, slots, starts, lens, *, n_pad: int, h: int, h_kv: int, d: int, cap: int,
             window: Optional[int], dtype: torch.dtype):
    """q/k/v with NaN padding tokens; caches that hold finite values only where some query may look."""
    t = sum(lens) + n_pad
    q, k, v = (torch.randn(t, n, d, generator=gen).to(dtype) for n in (h, h_kv, h_kv))
    for x in (q, k, v):
        x[sum(lens):] = NAN
    n_slots = len(slots) + 2
    cache_k = torch.full((n_slots, cap, h_kv, d), NAN, dtype=dtype)
    cache_v = torch.full((n_slots, cap, h_kv, d), NAN, dtype=dtype)
    for slot, start in zip(slots, starts):
        oldest = max(0, start - cap, start - window + 1 if window is not None else 0)
        idx = torch.arange(oldest, start) % cap
        cache_k[slot, idx] = torch.randn(len(idx), h_kv, d, generator=gen).to(dtype)
        cache_v[slot, idx] = torch.randn(len(idx), h_kv, d, generator=gen).to(dtype)
    return q, k, v, cache_k, cache_v


def _run_case(seed, *, g, h_kv=1, d=16, cap, window, n_seqs, max_len, max_start, block_m, decode_only=False,
              num_splits=1, dtype=torch.float32, tol=2e-5):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    slots, starts, lens = _mix(rng, n_seqs, cap, window, max_len, max_start, decode_only)
    q, k, v, ck, cv = _tensors(gen, slots, starts, lens, n_pad=3, h=g * h_kv, h_kv=h_kv, d=d, cap=cap,
                               window=window, dtype=dtype)
    layout = ra.VarlenLayout.for_tokens(q.shape[0], n_seqs + 1, block_m)
    batch = ra.plan_varlen(slots, starts, lens, max_seqs=layout.max_seqs, max_blocks=layout.max_blocks, block_m=block_m)
    scale = d**-0.5
    out = ra.ring_attention(q, k, v, ck, cv, batch, window=window, scale=scale, num_splits=num_splits, block_n=16)
    ref = reference_attention(q, k, v, ck, cv, slots, starts, lens, window, scale)
    n = sum(lens)
    assert out.dtype == dtype
    torch.testing.assert_close(out[:n].double(), ref[:n], rtol=tol, atol=tol)
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))  # padding tokens: zeros, not NaN


CASES = {
    # name: capacity, window, max chunk, max start, G, tokens per block
    "window<chunk, cap>window, G=1": dict(cap=12, window=8, max_len=30, max_start=70, g=1, h_kv=2, block_m=16),
    "cap==window, G=4": dict(cap=16, window=16, max_len=40, max_start=90, g=4, block_m=4),
    "window>chunks, G=2": dict(cap=24, window=20, max_len=9, max_start=60, g=2, block_m=8),
    "cap<window (older keys lost), G=2": dict(cap=8, window=20, max_len=12, max_start=40, g=2, block_m=8),
    "no window, G=4": dict(cap=24, window=None, max_len=20, max_start=0, g=4, block_m=8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_random_mixes_match_reference(name):
    for seed in range(2):
        _run_case(seed, n_seqs=5, **CASES[name])


def test_decode_only_wrapped_rings():
    _run_case(3, g=4, h_kv=2, cap=16, window=12, n_seqs=6, max_len=1, max_start=100, block_m=4, decode_only=True)


def test_one_long_chunk_with_decodes():
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    cap, window, g = 10, 10, 4
    slots, starts, lens = [4, 0, 1, 2, 3], [33, 55, 7, 120, 1], [40, 1, 1, 1, 1]
    rng.shuffle(slots)
    q, k, v, ck, cv = _tensors(gen, slots, starts, lens, n_pad=5, h=2 * g, h_kv=2, d=16, cap=cap, window=window,
                               dtype=torch.float32)
    batch = ra.plan_varlen(slots, starts, lens, max_seqs=6, max_blocks=12, block_m=8)
    out = ra.ring_attention(q, k, v, ck, cv, batch, window=window, scale=0.3, block_n=16)
    ref = reference_attention(q, k, v, ck, cv, slots, starts, lens, window, 0.3)
    torch.testing.assert_close(out[:44].double(), ref[:44], rtol=2e-5, atol=2e-5)
    assert torch.equal(out[44:], torch.zeros_like(out[44:]))


@pytest.mark.parametrize("decode_only", [True, False])
def test_split_keys_match_reference(decode_only):
    """Flash-decoding: each block's keys split over programs, merged in a second launch."""
    _run_case(5, g=2, cap=24, window=20, n_seqs=3, max_len=12, max_start=50, block_m=8, decode_only=decode_only,
              num_splits=4)


def test_half_inputs_accumulate_in_float32():
    """float16 only: the interpreter's tl.dot multiplies bfloat16 tiles as their raw uint16 bits
    (Triton 3.9), so bfloat16 is checked on the GPU by benchmarks/bench_attention.py."""
    _run_case(6, g=2, h_kv=1, d=32, cap=16, window=12, n_seqs=4, max_len=20, max_start=40, block_m=8,
              dtype=torch.float16, tol=2e-2)


def reference_write(cache_k, cache_v, k, v, slots, starts, lens):
    off = 0
    cap = cache_k.shape[1]
    for slot, start, n in zip(slots, starts, lens):
        for j in range(max(0, n - cap), n):
            cache_k[slot, (start + j) % cap] = k[off + j]
            cache_v[slot, (start + j) % cap] = v[off + j]
        off += n


def test_ring_write_matches_scatter():
    """Chunks longer than the ring keep their last `capacity` tokens; padding tokens and unused slots stay untouched."""
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    cap = 8
    slots, starts, lens = _mix(rng, 5, cap, 8, max_len=21, max_start=30)
    lens[0] = 19  # wraps the ring within the chunk
    q, k, v, ck, cv = _tensors(gen, slots, starts, lens, n_pad=4, h=2, h_kv=2, d=16, cap=cap, window=8,
                               dtype=torch.float32)
    ref_k, ref_v = ck.clone(), cv.clone()
    reference_write(ref_k, ref_v, k, v, slots, starts, lens)
    batch = ra.plan_varlen(slots, starts, lens, max_seqs=6, max_blocks=16, block_m=4)
    ra.ring_write(ck, cv, k, v, batch)
    torch.testing.assert_close(ck, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cv, ref_v, rtol=0, atol=0, equal_nan=True)


def test_planner_covers_every_token_once():
    rng = np.random.default_rng(8)
    lens = rng.integers(0, 50, size=13)
    lens[:4] = 1
    layout = ra.VarlenLayout.for_tokens(int(lens.sum()), 16, 8)
    batch = layout.views(torch.from_numpy(layout.plan(list(range(13)), [5] * 13, lens)))
    seq = batch.block_seq.numpy()
    first = batch.block_first.numpy()
    covered = sorted((int(s), int(f) + j) for s, f in zip(seq, first) if s >= 0 for j in range(8)
                     if int(f) + j < lens[s])
    assert covered == sorted((s, j) for s in range(13) for j in range(lens[s]))
    assert (batch.seq_offset.numpy()[:13] == np.cumsum(lens) - lens).all()
    assert (batch.seq_len.numpy()[13:] == 0).all()
    with pytest.raises(ValueError, match="max_seqs"):
        layout.plan(list(range(17)), [0] * 17, [1] * 17)
    with pytest.raises(ValueError, match="max_blocks"):
        layout.plan([0], [0], [8 * (layout.max_blocks + 1)])
    with pytest.raises(ValueError, match="power of two"):
        ra.VarlenLayout(4, 8, 6)


def test_worst_case_mix_fits_the_bucket_layout():
    for block_m in (1, 4, 16):
        for tokens, seqs in ((64, 8), (100, 33), (7, 7)):
            layout = ra.VarlenLayout.for_tokens(tokens, seqs, block_m)
            lens = [1] * (seqs - 1) + [tokens - seqs + 1]  # every sequence pays its partial block
            layout.plan(list(range(seqs)), [0] * seqs, lens)


def test_steps_match_the_sdpa_path():
    """Prefill chunks mixed with decodes over several steps: the kernels (attend, then write) produce the
    same attention outputs and the same cache as the model's padded SDPA path with build_inference_meta."""
    args = preset("tiny")
    torch.manual_seed(9)
    attn = Attention(args).double()
    cap, w, g = args.sliding_window, args.sliding_window, args.n_heads // args.n_kv_heads
    shape = (4, cap, args.n_kv_heads, args.head_dim)
    sdpa_cache = (torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))
    kern_cache = (torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))
    steps = [  # (slot, start, n) per step: chunks longer than the window, decodes beside chunks, decode-only
        [(0, 0, 12), (2, 0, 5)],
        [(0, 12, 20), (2, 5, 1), (3, 0, 12)],
        [(0, 32, 5), (2, 6, 1), (3, 12, 8)],
        [(0, 37, 1), (2, 7, 1), (3, 20, 1)],
    ]
    layout = ra.VarlenLayout.for_tokens(40, 4, 8)
    for step in steps:
        chunks = [SeqChunk(*c) for c in step]
        meta = build_inference_meta(chunks, capacity=cap, window=w, head_dim=args.head_dim,
                                    rope_theta=args.rope_theta, n_kv_groups=g)
        x = torch.randn(meta.n_tokens, args.dim, dtype=torch.float64)
        want = attn(x, meta, LayerCacheView(*sdpa_cache, meta.cache_access))

        t = meta.n_tokens
        q = apply_rope(attn.wq(x).view(t, args.n_heads, args.head_dim), meta.cos, meta.sin)
        k = apply_rope(attn.wk(x).view(t, args.n_kv_heads, args.head_dim), meta.cos, meta.sin)
        v = attn.wv(x).view(t, args.n_kv_heads, args.head_dim)
        pad = torch.full((3, *q.shape[1:]), NAN, dtype=q.dtype), torch.full((3, *k.shape[1:]), NAN, dtype=k.dtype)
        q, k, v = torch.cat([q, pad[0]]), torch.cat([k, pad[1]]), torch.cat([v, pad[1]])
        batch = layout.views(torch.from_numpy(layout.plan(*zip(*step))))
        out = ra.ring_attention(q, k, v, *kern_cache, batch, window=w, scale=args.head_dim**-0.5, block_n=16)
        ra.ring_write(*kern_cache, k, v, batch)
        got = attn.wo(out[:t].reshape(t, -1))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kern_cache[0], sdpa_cache[0], rtol=0, atol=0)
    torch.testing.assert_close(kern_cache[1], sdpa_cache[1], rtol=0, atol=0)
