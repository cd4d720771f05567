"""CUDA graphs for decode steps.

At small batch a decode step is bound by kernel launches, not by the GPU: hundreds of small
kernels per layer. A step with one token per sequence has a shape that depends only on the number
of sequences and on how much of the ring it reads, so it is captured once per (batch bucket,
read-length bucket) and replayed. Padding rows write into a scratch cache slot nobody owns.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable

import torch

from pp_runtime.attention_meta import AttentionMeta, SeqChunk


_META_FIELDS = [f.name for f in fields(AttentionMeta)]


def _bucket(n: int, floor: int, cap: int) -> int:
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


class DecodeGraphs:
    def __init__(self, module: torch.nn.Module, cache, scratch_slot: int, max_batch: int, capacity: int,
                 build_meta: Callable[..., AttentionMeta]) -> None:
        self.module, self.cache = module, cache
        self.scratch_slot, self.max_batch, self.capacity = scratch_slot, max_batch, capacity
        self.build_meta = build_meta
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMeta, torch.Tensor]] = {}

    def run(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        n = len(chunks)
        batch = _bucket(n, 1, max(self.max_batch, 1))
        read = _bucket(max(c.start + 1 for c in chunks), 128, self.capacity)
        padded = chunks + [SeqChunk(self.scratch_slot, 0, 1)] * (batch - n)
        meta = self.build_meta(padded, device="cpu", min_read_len=read)
        key = (batch, meta.cache_read_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, n, batch, meta)
        graph, static_x, static_meta, static_out = self.graphs[key]
        static_x[:n].copy_(x)
        for name in _META_FIELDS:
            src = getattr(meta, name)
            if isinstance(src, torch.Tensor):
                getattr(static_meta, name).copy_(src, non_blocking=True)
        graph.replay()
        return static_out[:n]

    def _capture(self, x: torch.Tensor, n: int, batch: int, meta: AttentionMeta):
        dev = x.device
        static_x = torch.zeros((batch, *x.shape[1:]), dtype=x.dtype, device=dev)
        static_x[:n].copy_(x)
        values = {name: getattr(meta, name) for name in _META_FIELDS}
        static_meta = AttentionMeta(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: rewrites the same K/V the step writes anyway
            for _ in range(2):
                self.module(static_x, static_meta, self.cache, logits="last")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.module(static_x, static_meta, self.cache, logits="last")
        return graph, static_x, static_meta, static_out
