"""Pipelined generation: stage 0 schedules, every stage computes its layers, the last samples.

Stage 0 keeps up to `microbatches` micro-batches in the pipe. Each carries its own metadata (which
sequences, slots, positions, sampling settings) with the activations, so all stages agree by
construction. The last stage returns only the sampled token ids and their logprobs. With one stage
the same loop runs with no communication at all.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from pp_runtime.args import ModelArgs
from pp_runtime.attention_meta import SeqChunk, build_inference_meta
from pp_runtime.comm import KIND_ABORT, KIND_DATA, KIND_STOP, PeerLink, decode_text, encode_text
from pp_runtime.errors import ConfigError, PPRuntimeError
from pp_runtime.kv_cache import RollingKVCache
from pp_runtime.model import StageModule
from pp_runtime.parallel import ParallelContext
from pp_runtime.prompts import check_request, token_limit
from pp_runtime.sampling import SamplingBatch, SamplingParams, sample_tokens
from pp_runtime.scheduler import ChunkPlan, Completion, MicroBatch, Request, SchedulerConfig, StepScheduler


@dataclass(frozen=True)
class InferenceConfig:
    microbatches: int = 0  # in flight; 0 = number of stages
    batch_size: int = 16  # sequences per micro-batch
    max_batch_tokens: int = 4096  # token budget per micro-batch (prefill chunks + decode tokens)
    chunk_size: int = 0  # longest prefill chunk; 0 = the sliding window
    cache_len: int = 0  # ring length per sequence; 0 = window (or the model's max_seq_len without one)
    cuda_graphs: bool = True  # replay captured decode steps on GPU (dense models)

    def resolved(self, args: ModelArgs, n_stages: int) -> "InferenceConfig":
        mb = self.microbatches or n_stages
        capacity = self.cache_len or (args.sliding_window or args.max_seq_len)
        if args.sliding_window is not None:
            capacity = min(capacity, args.sliding_window) if self.cache_len == 0 else capacity
        chunk = self.chunk_size or min(args.window, capacity)
        cfg = InferenceConfig(mb, self.batch_size, self.max_batch_tokens, chunk, capacity, self.cuda_graphs)
        for name in ("microbatches", "batch_size", "max_batch_tokens", "chunk_size", "cache_len"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"inference.{name}={getattr(cfg, name)} must be at least 1")
        return cfg


@dataclass
class RunStats:
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0  # wall time attributed to micro-batches that carried prompt tokens
    decode_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0  # decode-only micro-batches
    busy_s: list[float] = field(default_factory=list)  # per stage: time spent computing
    loop_s: list[float] = field(default_factory=list)  # per stage: time in its serving loop

    @property
    def busy_fraction(self) -> list[float]:
        return [b / l if l > 0 else 0.0 for b, l in zip(self.busy_s, self.loop_s)]

    def summary(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dc = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        busy = ", ".join(f"stage {i}: {100 * f:.0f}%" for i, f in enumerate(self.busy_fraction))
        return (
            f"{self.prompts} prompts | {self.prompt_tokens} prompt tokens, {self.generated_tokens} generated | "
            f"wall {self.wall_s:.2f}s | prefill {pf:,.0f} tok/s | decode {dc:,.0f} tok/s | "
            f"overall {self.generated_tokens / max(self.wall_s, 1e-9):,.1f} generated tok/s\nbusy: {busy}"
        )


class _BusyClock:
    """Compute time of one stage: CUDA events on GPU (no sync in the loop), host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((token, ev))
        else:
            self.host += time.perf_counter() - token

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        return self.host


@dataclass(frozen=True)
class StepChunk:
    """What every stage knows of one sequence in a micro-batch: the header row that travels with it."""

    uid: int
    slot: int
    start: int
    n_tokens: int
    sample: bool
    sampling: SamplingParams

    @classmethod
    def of(cls, c: ChunkPlan) -> "StepChunk":
        return cls(c.uid, c.slot, c.start, len(c.tokens), c.sample, c.sampling)


def _encode_chunks(chunks: list[StepChunk]) -> torch.Tensor:
    """int64 [n, 9]: uid, slot, start, n_tokens, sample, seed, then temperature, top_p, top_k as float64 bits."""
    ints = torch.tensor([[c.uid, c.slot, c.start, c.n_tokens, int(c.sample), c.sampling.seed] for c in chunks],
                        dtype=torch.int64)
    floats = torch.tensor([[c.sampling.temperature, c.sampling.top_p, float(c.sampling.top_k)] for c in chunks],
                          dtype=torch.float64).view(torch.int64)
    return torch.cat([ints, floats], dim=1)


def _decode_chunks(table: torch.Tensor) -> list[StepChunk]:
    table = table.cpu()
    ints = table[:, :6].tolist()
    floats = table[:, 6:].contiguous().view(torch.float64).tolist()
    return [
        StepChunk(u, s, st, n, bool(sm), SamplingParams(temperature=t, top_p=p, top_k=int(k), seed=sd))
        for (u, s, st, n, sm, sd), (t, p, k) in zip(ints, floats)
    ]


class StageRunner:
    """One stage's module and its shard of the rolling KV cache; the last stage also samples."""

    def __init__(self, args: ModelArgs, module: StageModule, cfg: InferenceConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.args, self.module, self.cfg, self.device = args, module.eval(), cfg, device
        n_slots = cfg.microbatches * cfg.batch_size
        use_graphs = cfg.cuda_graphs and device.type == "cuda" and not args.is_moe  # MoE routing syncs the host
        self.cache = RollingKVCache(list(module.spec.layers), n_slots + int(use_graphs), cfg.cache_len,
                                    args.n_kv_heads, args.head_dim, dtype, device)
        self.clock = _BusyClock(device)
        self.graphs = None
        if use_graphs:
            from pp_runtime.decode_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.module, self.cache, n_slots, cfg.batch_size, cfg.cache_len, self._meta)

    def _meta(self, chunks: list[SeqChunk], device, min_read_len: int = 0):
        return build_inference_meta(
            chunks, capacity=self.cfg.cache_len, window=self.args.sliding_window, head_dim=self.args.head_dim,
            rope_theta=self.args.rope_theta, n_kv_groups=self.args.n_heads // self.args.n_kv_heads,
            device=device, min_read_len=min_read_len,
        )

    def forward(self, x: torch.Tensor, chunks: Sequence[StepChunk | SeqChunk]) -> torch.Tensor:
        seqs = [SeqChunk(c.slot, c.start, c.n_tokens) for c in chunks]
        with torch.inference_mode():
            if self.graphs is not None and all(c.n_tokens == 1 for c in seqs):
                return self.graphs.run(x, seqs)
            return self.module(x, self._meta(seqs, self.device), self.cache, logits="last")

    def sample(self, logits: torch.Tensor, chunks: Sequence[StepChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.module.spec.has_head
        positions = [c.start + c.n_tokens for c in chunks]  # the position the sampled token will take
        params = [c.sampling for c in chunks]
        batch = SamplingBatch.build(params, [c.uid for c in chunks], positions, logits.device)
        ids, logprobs, _ = sample_tokens(logits, batch, greedy_only=all(p.temperature == 0 for p in params))
        return ids, logprobs


def _checked_requests(requests: Iterator[Request], args: ModelArgs, capacity: int) -> Iterator[Request]:
    limit = token_limit(args, capacity)
    for r in requests:
        check_request(r, limit, f"request {r.id!r}")
        yield r


def run_pipeline(
    ctx: ParallelContext,
    runner: StageRunner,
    requests: Optional[Iterator[Request]] = None,
    eos_id: Optional[int] = None,
    on_complete: Optional[Callable[[Completion], None]] = None,
) -> tuple[list[Completion], RunStats]:
    """Run this rank's part of pipelined generation. Only the first stage passes `requests`.

    Completions go to `on_complete` as they finish; without it the first stage returns them
    (in finishing order). Every rank returns the run's statistics."""
    link = PeerLink(ctx.device, ctx.pp_group)
    runner.clock = _BusyClock(ctx.device)
    t0 = time.perf_counter()
    stats = RunStats()
    try:
        if ctx.is_first:
            completions = _drive(ctx, runner, link, requests or iter(()), eos_id, on_complete, stats)
        else:
            completions = []
            _serve(ctx, runner, link)
    finally:
        link.flush()
    loop_s = time.perf_counter() - t0
    busy = runner.clock.total()
    stats.wall_s = loop_s
    if ctx.pp_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * ctx.pp_size
        dist.all_gather_object(gathered, (busy, loop_s), group=ctx.pp_group)
        stats.busy_s, stats.loop_s = [g[0] for g in gathered], [g[1] for g in gathered]
    else:
        stats.busy_s, stats.loop_s = [busy], [loop_s]
    return completions, stats


def _drive(ctx, runner: StageRunner, link: PeerLink, requests, eos_id, on_complete, stats: RunStats):
    cfg = runner.cfg
    sched = StepScheduler(
        SchedulerConfig(cfg.microbatches * cfg.batch_size, cfg.batch_size, cfg.max_batch_tokens, cfg.chunk_size),
        _checked_requests(requests, runner.args, cfg.cache_len), eos_id,
    )
    inflight: deque[MicroBatch] = deque()
    completions: list[Completion] = []
    last_t = time.perf_counter()

    def finish(mb: MicroBatch, tokens: list[int], logprobs: list[float]) -> None:
        nonlocal last_t
        now = time.perf_counter()
        if any(c.prefill for c in mb.chunks):
            stats.prefill_s += now - last_t
        else:
            stats.decode_s += now - last_t
            stats.decode_tokens += len(mb.chunks)
            stats.decode_steps += 1
        last_t = now
        for comp in sched.complete(mb, tokens, logprobs):
            stats.prompts += 1
            stats.prompt_tokens += len(comp.request.prompt_tokens)
            stats.generated_tokens += len(comp.tokens)
            if on_complete is not None:
                on_complete(comp)  # streamed: nothing accumulates, whatever the input size
            else:
                completions.append(comp)

    try:
        while True:
            while len(inflight) < cfg.microbatches:
                mb = sched.next_microbatch()
                if mb is None:
                    break
                tokens = torch.tensor([t for c in mb.chunks for t in c.tokens], dtype=torch.long).to(ctx.device)
                chunks = [StepChunk.of(c) for c in mb.chunks]
                tok = runner.clock.start()
                out = runner.forward(tokens, chunks)
                if ctx.pp_size == 1:
                    ids, lps = runner.sample(out, chunks)
                    runner.clock.stop(tok)
                    finish(mb, ids.tolist(), lps.tolist())
                    continue
                runner.clock.stop(tok)
                link.send(ctx.next, KIND_DATA, [_encode_chunks(chunks).to(ctx.device), out])
                inflight.append(mb)
            if not inflight:
                if sched.done:
                    break
                continue
            msg = link.recv(ctx.last)
            finish(inflight.popleft(), msg.tensors[0].tolist(), msg.tensors[1].tolist())
    except PPRuntimeError as e:
        if ctx.pp_size > 1:
            link.send(ctx.next, KIND_ABORT, [encode_text(str(e)).to(ctx.device)])
        raise
    if ctx.pp_size > 1:
        link.send(ctx.next, KIND_STOP)
    return completions


def _serve(ctx, runner: StageRunner, link: PeerLink) -> None:
    while True:
        msg = link.recv(ctx.prev)
        if msg.kind in (KIND_STOP, KIND_ABORT):
            if not ctx.is_last:
                link.send(ctx.next, msg.kind, msg.tensors)
            if msg.kind == KIND_ABORT:
                raise PPRuntimeError(decode_text(msg.tensors[0]))
            return
        table, x = msg.tensors
        chunks = _decode_chunks(table)
        tok = runner.clock.start()
        out = runner.forward(x, chunks)
        if ctx.is_last:
            ids, lps = runner.sample(out, chunks)
            runner.clock.stop(tok)
            link.send(ctx.first, KIND_DATA, [ids, lps.float()])
        else:
            runner.clock.stop(tok)
            link.send(ctx.next, KIND_DATA, [table, out])
