"""The fast generation path of one stage: fused kernels, varlen ring attention, one graph per bucket.

A step's token count is padded to a bucket (a few sizes), and everything a step reads lives in
fixed device buffers refilled by one host-to-device copy of int32 metadata (tokens, positions,
last-token rows, the varlen plan) plus one of sampling settings. On GPU each bucket (and on the last
stage each of greedy / sampled) is captured once at start-up as a CUDA graph and replayed;
padding tokens belong to no sequence, so attention gives them zeros and they write nothing into
the cache.

Graphs are captured with an empty plan (every sequence of length 0): capture and its warm-up
runs then touch no cache entry, and every real step runs exactly once, by replay.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pp_runtime.inference.fused_ops import add_rms_norm, rope_qk_, rope_tables, silu_mul
from pp_runtime.inference.ring_attention import VarlenLayout, decode_splits, default_block_m, ring_attention, ring_write
from pp_runtime.inference.sampling import SamplingBatch, sample_tokens
from pp_runtime.inference.step_table import Step
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.kv_cache import RollingKVCache
from pp_runtime.model.transformer import StageModule


def token_buckets(max_tokens: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest`, then the budget itself rounded up to a multiple of 16."""
    top = -(-max_tokens // 16) * 16
    out, b = [], smallest
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


@dataclass
class _Block:
    """One transformer block's weights in fused form (views where the module keeps the originals)."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2 Hkv) D, dim]: wq, wk, wv stacked, one matmul
    wo: torch.Tensor
    w13: Optional[torch.Tensor]  # [2 F, dim]: w1 then w3 (dense), one matmul
    w2: Optional[torch.Tensor]
    moe: Optional[torch.nn.Module]


def _fuse_rows(linears: Sequence[torch.nn.Module]) -> torch.Tensor:
    """Stack the weights of several Linears into one tensor and make each Linear a view of it,
    so the fused matmul costs no extra memory and the module keeps working as written."""
    fused = torch.cat([m.weight.detach() for m in linears], dim=0)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row : row + n]
        row += n
    return fused


def fuse_blocks(module: StageModule) -> list[_Block]:
    blocks = []
    for blk in module.layers.values():
        a, ff = blk.attention, blk.feed_forward
        dense = hasattr(ff, "w1")
        blocks.append(_Block(
            attn_norm=blk.attention_norm.weight.detach(), ffn_norm=blk.ffn_norm.weight.detach(),
            wqkv=_fuse_rows([a.wq, a.wk, a.wv]), wo=a.wo.weight.detach(),
            w13=_fuse_rows([ff.w1, ff.w3]) if dense else None, w2=ff.w2.weight.detach() if dense else None,
            moe=None if dense else ff,
        ))
    return blocks


@dataclass
class _Bucket:
    """Fixed buffers of one token bucket and, once captured, its graphs."""

    tokens: int
    layout: VarlenLayout
    splits: int
    meta: torch.Tensor  # int32 [2T + S + 1 + plan]: tokens, positions, last-token rows, real tokens, plan
    x: Optional[torch.Tensor]  # [T, dim] received activations (stages after the first)
    graphs: dict  # greedy_only -> (CUDAGraph, static output)


class FastStage:
    def __init__(self, args: ModelArgs, module: StageModule, cache: RollingKVCache, cfg, device: torch.device,
                 scratch_slot: int, graphs: bool) -> None:
        self.args, self.module, self.cache, self.device = args, module, cache, device
        self.rows = cfg.batch_size
        self.scratch_slot = scratch_slot
        self.use_graphs = graphs
        self.dtype = cache.k.dtype
        self.first, self.last = module.spec.has_embedding, module.spec.has_head
        self.blocks = fuse_blocks(module)
        self.layer_caches = [cache.layer(int(i)) for i in module.layers.keys()]
        self.cos, self.sin = rope_tables(args.max_seq_len, args.head_dim, args.rope_theta, device)
        self.groups = args.n_heads // args.n_kv_heads
        self.buckets: dict[int, _Bucket] = {}
        self.bucket_sizes = token_buckets(cfg.max_batch_tokens)
        self.sampling = SamplingBatch.build([], [], [], device, pad_to=self.rows) if self.last else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.capture_s = 0.0
        self.n_graphs = 0
        if graphs:  # all at start-up: a capture inside a run would stall the pipe for a fraction of a second
            for tokens in self.bucket_sizes:
                for greedy in ((True, False) if self.last else (True,)):
                    b = self._bucket(tokens)
                    b.graphs[greedy] = self._capture(b, greedy)

    # ------------------------------------------------------------------ shapes
    def bucket_for(self, n_tokens: int) -> int:
        for b in self.bucket_sizes:
            if n_tokens <= b:
                return b
        raise ValueError(f"a step of {n_tokens} tokens exceeds inference.max_batch_tokens")

    def _bucket(self, tokens: int) -> _Bucket:
        if tokens not in self.buckets:
            decode_like = tokens <= 2 * self.rows
            block_m = default_block_m(self.groups, decode_like)
            layout = VarlenLayout.for_tokens(tokens, self.rows, block_m)
            splits = 1
            if self.device.type == "cuda" and tokens <= 16:  # few sequences reading long rings
                n_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
                splits = decode_splits(-(-tokens // block_m), self.args.n_kv_heads, self.cache.capacity, n_sms=n_sms)
            meta = torch.zeros(2 * tokens + self.rows + 1 + layout.size, dtype=torch.int32, device=self.device)
            x = None if self.first else torch.zeros((tokens, self.args.dim), dtype=self.dtype, device=self.device)
            self.buckets[tokens] = _Bucket(tokens, layout, splits, meta, x, {})
        return self.buckets[tokens]

    def input_buffer(self, tokens: int) -> torch.Tensor:
        return self._bucket(tokens).x

    # ------------------------------------------------------------------ one step
    def _host_meta(self, b: _Bucket, step: Step, tokens: Optional[Sequence[int]]) -> np.ndarray:
        t, s = b.tokens, self.rows
        chunks = step.chunks
        lens = np.array([c.n_tokens for c in chunks], dtype=np.int64)
        starts = np.array([c.start for c in chunks], dtype=np.int64)
        n = int(lens.sum())
        out = np.zeros(2 * t + s + 1 + b.layout.size, dtype=np.int32)
        if tokens is not None:
            out[:n] = tokens
        offsets = np.cumsum(lens) - lens
        out[t : t + n] = np.repeat(starts - offsets, lens) + np.arange(n)  # positions
        out[2 * t : 2 * t + len(chunks)] = offsets + lens - 1  # each sequence's last token
        out[2 * t + s] = n  # real tokens: MoE layers count experts' load on these only
        out[2 * t + s + 1 :] = b.layout.plan([c.slot for c in chunks], starts, lens)
        return out

    def run(self, step: Step, tokens: Optional[Sequence[int]] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = self._bucket(step.bucket)
        host = torch.from_numpy(self._host_meta(b, step, tokens))
        on_gpu = self.device.type == "cuda"
        b.meta.copy_(host.pin_memory() if on_gpu else host, non_blocking=on_gpu)
        if self.sampling is not None and not step.greedy_only:  # greedy graphs never read the settings
            self.sampling.fill_([c.sampling for c in step.chunks], [c.uid for c in step.chunks],
                                [c.start + c.n_tokens for c in step.chunks])
        if x is not None and x is not b.x:
            b.x.copy_(x)
        greedy = step.greedy_only or not self.last  # only the sampler differs between the two
        if not self.use_graphs:
            return self._forward(b, greedy)
        graph, out = b.graphs[greedy]
        graph.replay()
        return out.clone()  # the caller may send it while later steps replay into `out`

    def _capture(self, b: _Bucket, greedy: bool):
        """Capture with an empty plan: no sequence, so no cache entry is read or written."""
        t0 = time.perf_counter()
        empty = np.zeros(b.meta.numel(), dtype=np.int32)
        empty[2 * b.tokens + self.rows + 1 :] = b.layout.plan([], [], [])
        b.meta.copy_(torch.from_numpy(empty))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b, greedy)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, greedy)
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0
        self.n_graphs += 1
        return graph, out

    def graph_summary(self) -> str:
        if not self.use_graphs:
            return ""
        return f"{self.n_graphs} graphs ({len(self.buckets)} token buckets) captured at start-up in {self.capture_s:.1f}s"

    # ------------------------------------------------------------------ the fused forward
    def _forward(self, b: _Bucket, greedy: bool) -> torch.Tensor:
        a = self.args
        t, s = b.tokens, self.rows
        tokens, positions = b.meta[:t], b.meta[t : 2 * t]
        last_rows = b.meta[2 * t : 2 * t + s]
        n_real = b.meta[2 * t + s]
        varlen = b.layout.views(b.meta[2 * t + s + 1 :])
        hq, hk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        eps = a.norm_eps
        h = F.embedding(tokens, self.module.tok_embeddings.weight) if self.first else b.x
        res = None
        scale = 1.0 / math.sqrt(a.head_dim)
        for blk, (ck, cv) in zip(self.blocks, self.layer_caches):
            normed, res = add_rms_norm(h, res, blk.attn_norm, eps)
            qkv = F.linear(normed, blk.wqkv)
            q = qkv[:, :hq].view(t, a.n_heads, a.head_dim)
            k = qkv[:, hq : hq + hk].view(t, a.n_kv_heads, a.head_dim)
            v = qkv[:, hq + hk :].view(t, a.n_kv_heads, a.head_dim)
            rope_qk_(q, k, positions, self.cos, self.sin)
            o = ring_attention(q, k, v, ck, cv, varlen, window=a.sliding_window, scale=scale, num_splits=b.splits)
            ring_write(ck, cv, k, v, varlen)
            h = F.linear(o.view(t, hq), blk.wo)
            normed, res = add_rms_norm(h, res, blk.ffn_norm, eps)
            if blk.moe is None:
                h = F.linear(silu_mul(F.linear(normed, blk.w13)), blk.w2)
            else:
                h = blk.moe(normed, valid_tokens=n_real)
        if not self.last:
            return h if res is None else h + res
        normed, _ = add_rms_norm(h, res, self.module.norm.weight, eps)
        logits = F.linear(normed.index_select(0, last_rows), self.module.output.weight).float()
        ids, lps, finite = sample_tokens(logits, self.sampling, greedy_only=greedy)
        return torch.stack([ids.double(), lps.double(), finite.double()], dim=1)
