"""Rolling cache + chunked, packed prefill against a naive full-attention reference."""

from __future__ import annotations

import random

import pytest
import torch

from pp_runtime.model.args import preset
from pp_runtime.model.attention_meta import SeqChunk, build_inference_meta, build_training_meta
from pp_runtime.model.kv_cache import RollingKVCache
from pp_runtime.model.moe import unstack_experts
from pp_runtime.model.partition import plan_for
from pp_runtime.model.transformer import StageModule
from reference import naive_logits


def _model(name: str, seed: int = 0, **overrides):
    args = preset(name, **overrides)
    torch.manual_seed(seed)
    m = StageModule(args, plan_for(args, 1).stages[0]).double()
    for n, p in m.named_parameters():
        torch.nn.init.normal_(p, std=0.3 if not n.endswith("norm.weight") else 0.1)
    return args, m


def _meta(args, chunks, capacity=None):
    return build_inference_meta(
        chunks, capacity=capacity or args.window, window=args.sliding_window, head_dim=args.head_dim,
        rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads,
    )


def _chunked_logits(args, m, prompts, chunk, capacity=None):
    """Prefill all prompts together, `chunk` tokens of each per step, packed into one flat stream."""
    cap = capacity or args.window
    cache = RollingKVCache(list(range(args.n_layers)), len(prompts) + 1, cap, args.n_kv_heads, args.head_dim, torch.float64)
    out = [[] for _ in prompts]
    fed = [0] * len(prompts)
    while any(f < len(p) for f, p in zip(fed, prompts)):
        live = [i for i, p in enumerate(prompts) if fed[i] < len(p)]
        chunks, toks = [], []
        for i in live:
            n = min(chunk, len(prompts[i]) - fed[i])
            chunks.append(SeqChunk(slot=i + 1, start=fed[i], n_tokens=n))  # slot 0 unused: slots need not be dense
            toks += prompts[i][fed[i] : fed[i] + n]
        logits = m(torch.tensor(toks), _meta(args, chunks, cap), cache, logits="all")
        off = 0
        for i, ch in zip(live, chunks):
            out[i].append(logits[off : off + ch.n_tokens])
            off += ch.n_tokens
            fed[i] += ch.n_tokens
    return [torch.cat(o) for o in out], cache


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("chunk_of_window", [1 / 16, 0.5, 1, 3])
def test_chunked_prefill_matches_full_attention(name, chunk_of_window):
    args, m = _model(name)
    w = args.sliding_window
    chunk = max(1, int(w * chunk_of_window))
    rng = random.Random(0)
    # unequal lengths, the longest wraps the ring 5 times
    prompts = [[rng.randrange(args.vocab_size) for _ in range(n)] for n in (5 * w + 3, 2 * w - 1, 7, w)]
    got, _ = _chunked_logits(args, m, prompts, chunk)
    sd = unstack_experts(m.state_dict())
    for p, g in zip(prompts, got):
        ref = naive_logits(args, sd, p)
        torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-7)


def test_packed_equals_one_at_a_time():
    args, m = _model("tiny")
    rng = random.Random(1)
    prompts = [[rng.randrange(args.vocab_size) for _ in range(n)] for n in (40, 3, 17, 33)]
    packed, _ = _chunked_logits(args, m, prompts, chunk=16)
    for p, g in zip(prompts, packed):
        alone, _ = _chunked_logits(args, m, [p], chunk=16)
        torch.testing.assert_close(g, alone[0], rtol=1e-8, atol=1e-8)


def test_decode_after_prefill_wraps_the_ring():
    """Token-by-token decode (the write-then-attend path) over 8 windows equals the reference."""
    args, m = _model("tiny", seed=2)
    rng = random.Random(2)
    seqs = [[rng.randrange(args.vocab_size) for _ in range(8 * args.sliding_window)] for _ in range(2)]
    got, _ = _chunked_logits(args, m, seqs, chunk=1)
    for s, g in zip(seqs, got):
        torch.testing.assert_close(g, naive_logits(args, m.state_dict(), s), rtol=1e-7, atol=1e-7)


def test_no_sliding_window():
    args, m = _model("tiny", sliding_window=None, max_seq_len=96)
    rng = random.Random(3)
    prompts = [[rng.randrange(args.vocab_size) for _ in range(n)] for n in (90, 41)]
    got, _ = _chunked_logits(args, m, prompts, chunk=16, capacity=96)
    for p, g in zip(prompts, got):
        torch.testing.assert_close(g, naive_logits(args, m.state_dict(), p), rtol=1e-7, atol=1e-7)


def test_training_rows_pack_documents_block_diagonally():
    args, m = _model("tiny")
    rng = random.Random(4)
    docs = [[rng.randrange(args.vocab_size) for _ in range(n)] for n in (30, 10, 24)]
    meta = build_training_meta([[30, 10, 24]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    got = m(torch.tensor(sum(docs, [])), meta, logits="all")
    ref = torch.cat([naive_logits(args, m.state_dict(), d) for d in docs])
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)


def test_cache_memory_is_bounded_by_the_window():
    """Cache bytes and the attention span stay fixed while a sequence grows from W to 8W tokens."""
    args, m = _model("tiny")
    w = args.sliding_window
    cache = RollingKVCache(list(range(args.n_layers)), 1, w, args.n_kv_heads, args.head_dim, torch.float64)
    expected = 2 * args.n_layers * w * args.n_kv_heads * args.head_dim * 8
    assert cache.nbytes == expected
    tok = torch.tensor([5])
    spans = []
    for pos in range(8 * w):
        meta = _meta(args, [SeqChunk(0, pos, 1)])
        spans.append(meta.mask.shape[-1])
        m(tok, meta, cache)
        assert cache.nbytes == expected
        assert cache.k.data_ptr() == cache.layer(0)[0].data_ptr()  # never reallocated
    assert max(spans) == w and spans[-1] == w
