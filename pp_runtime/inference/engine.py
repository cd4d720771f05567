"""Pipelined generation: stage 0 schedules, every stage computes its layers, the last samples.

Stage 0 keeps up to `microbatches` micro-batches in the pipe. A step's table (which sequences,
slots, positions, sampling settings) goes down the pipe on the CPU control plane ahead of its
activations, so every stage prepares a step while its GPU still runs the previous one, and all
stages agree by construction. The last stage returns only token ids, logprobs and a finiteness
flag. With one stage the same loop runs with no communication at all.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Optional

import torch
import torch.distributed as dist

from pp_runtime.distributed.comm import KIND_ABORT, KIND_DATA, KIND_STOP, StageChannels, decode_text, encode_text
from pp_runtime.distributed.parallel import ParallelContext, pipe_groups
from pp_runtime.errors import ConfigError, PPRuntimeError
from pp_runtime.inference.batching import Completion, StepPlan, Request, SchedulerConfig, StepScheduler
from pp_runtime.inference.requests import TokenLimit, check_request
from pp_runtime.inference.stage_runner import StageRunner
from pp_runtime.inference.step_table import Step, StepChunk
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.moe import ExpertLoad, expert_token_counts, moe_layers

__all__ = ["InferenceConfig", "RunStats", "StageRunner", "run_pipeline"]


@dataclass(frozen=True)
class InferenceConfig:
    """The generation engine's settings: the `inference` group of the jobs' configs (registered with
    Hydra as its schema by pp_runtime/jobs/config.py, so these defaults are the only ones)."""

    microbatches: int = 0  # micro-batches in flight; 0 = stages + 1 (one more than the pipe holds: the host's turn hides)
    batch_size: int = 16  # sequences per micro-batch (cache slots = microbatches x batch_size)
    max_batch_tokens: int = 4096  # token budget per micro-batch: prefill chunks + decode tokens
    chunk_size: int = 0  # longest prefill chunk; 0 = the sliding window
    cache_len: int = 0  # ring entries per sequence; 0 = the window, or for a model without one the
    #                     context, shortened on GPU to what gpu_memory_fraction leaves
    cuda_graphs: bool = True  # replay every step as a captured CUDA graph (GPU, fused path)
    attention: str = "auto"  # auto (fused Triton path on GPU, SDPA on CPU) | sdpa | triton
    gpu_memory_fraction: float = 0.9  # share of the GPU that weights, activations and the cache may use
    cache_from_memory: ClassVar[bool] = False  # set by `resolved`: cache_len may shrink to the memory budget

    def __post_init__(self) -> None:
        for name in ("microbatches", "batch_size", "max_batch_tokens", "chunk_size", "cache_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"inference.{name}={value!r} must be a whole number (0: the default where it has one)")
        if self.attention not in ("auto", "sdpa", "triton"):
            raise ConfigError(f"inference.attention={self.attention!r}: use auto, sdpa or triton")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"inference.gpu_memory_fraction={self.gpu_memory_fraction} must be in (0, 1]")

    def resolved(self, args: ModelArgs, n_stages: int) -> "InferenceConfig":
        capacity = self.cache_len or (args.sliding_window or args.max_seq_len)
        chunk = self.chunk_size or min(args.window, capacity)
        cfg = dataclasses.replace(self, microbatches=self.microbatches or n_stages + 1, chunk_size=chunk,
                                  cache_len=capacity)
        object.__setattr__(cfg, "cache_from_memory", self.cache_len == 0 and args.sliding_window is None)
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
    graphs: list[str] = field(default_factory=list)  # per stage: graphs captured and capture time
    expert_load: str = ""  # MoE: tokens per expert per layer over the run (min / mean / max)

    @property
    def busy_fraction(self) -> list[float]:
        return [b / l if l > 0 else 0.0 for b, l in zip(self.busy_s, self.loop_s)]

    def summary(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dc = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        busy = ", ".join(f"stage {i}: {100 * f:.0f}%" for i, f in enumerate(self.busy_fraction))
        lines = [
            f"{self.prompts} prompt{'' if self.prompts == 1 else 's'} | {self.prompt_tokens} prompt tokens, "
            f"{self.generated_tokens} generated | wall {self.wall_s:.2f}s | prefill {pf:,.0f} tok/s | "
            f"decode {dc:,.0f} tok/s | overall {self.generated_tokens / max(self.wall_s, 1e-9):,.1f} generated tok/s",
            f"busy: {busy}",
        ]
        if any(self.graphs):
            lines.append("cuda graphs: " + "; ".join(f"stage {i}: {g}" for i, g in enumerate(self.graphs)))
        if self.expert_load:
            lines.append(f"experts: {self.expert_load}")
        return "\n".join(lines)


def _checked_requests(requests: Iterator[Request], args: ModelArgs, capacity: int) -> Iterator[Request]:
    limit = TokenLimit.of(args, capacity)
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
    channels = None
    capacity = runner.capacity
    if ctx.pp_size > 1:
        groups = pipe_groups(ctx)
        channels = StageChannels(
            groups, ctx.prev if not ctx.is_first else None, ctx.next if not ctx.is_last else None,
            ctx.first, ctx.last, runner.cfg.batch_size + 1,
        )
        cap = torch.tensor([capacity], dtype=torch.int64)
        dist.all_reduce(cap, op=dist.ReduceOp.MIN, group=groups.control)  # stages may size rings apart
        capacity = int(cap)
    runner.reset_clock()
    t0 = time.perf_counter()
    stats = RunStats()
    try:
        if ctx.is_first:
            completions = _drive(runner, channels, requests or iter(()), eos_id, on_complete, stats, capacity)
        else:
            completions = []
            _serve(runner, channels, ctx.is_last)
    finally:
        if channels is not None:
            channels.flush()
    loop_s = time.perf_counter() - t0
    busy = runner.busy_seconds()
    stats.wall_s = loop_s
    counts = expert_token_counts(runner.module, reset=True)
    mine = (busy, loop_s, runner.graph_summary(),
            None if counts is None else (counts.cpu(), len(moe_layers(runner.module))))
    if ctx.pp_size > 1:
        gathered: list = [None] * ctx.pp_size
        dist.all_gather_object(gathered, mine, group=pipe_groups(ctx).control)
    else:
        gathered = [mine]
    stats.busy_s, stats.loop_s, stats.graphs = ([g[i] for g in gathered] for i in range(3))
    loads = [g[3] for g in gathered if g[3] is not None]
    if loads:
        stats.expert_load = ExpertLoad.from_counts(sum(c for c, _ in loads), sum(n for _, n in loads)).line()
    return completions, stats


@dataclass
class _InFlight:
    mb: StepPlan
    results: torch.Tensor  # [rows, 3] float64: token id, logprob, finite (host memory once `ready`)
    ready: object  # a CUDA event, or on CPU the receive's Work (None with one stage)


def _drive(runner: StageRunner, channels: Optional[StageChannels], requests, eos_id, on_complete,
           stats: RunStats, capacity: int) -> list[Completion]:
    cfg = runner.cfg
    sched = StepScheduler(
        SchedulerConfig(cfg.microbatches * cfg.batch_size, cfg.batch_size, cfg.max_batch_tokens, cfg.chunk_size,
                        cfg.microbatches),
        _checked_requests(requests, runner.args, capacity), eos_id,
    )
    inflight: deque[_InFlight] = deque()
    completions: list[Completion] = []
    last_t = time.perf_counter()

    def finish(item: _InFlight) -> None:
        nonlocal last_t
        if isinstance(item.ready, dist.Work):
            item.ready.wait()
        elif item.ready is not None:
            item.ready.synchronize()
        n = len(item.mb.chunks)
        ids, lps, finite = item.results[:n].cpu().T.tolist()
        now = time.perf_counter()
        if any(c.prefill for c in item.mb.chunks):
            stats.prefill_s += now - last_t
        else:
            stats.decode_s += now - last_t
            stats.decode_tokens += n
            stats.decode_steps += 1
        last_t = now
        for comp in sched.complete(item.mb, [int(t) for t in ids], lps, [f > 0 for f in finite]):
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
                tokens = [t for c in mb.chunks for t in c.tokens]
                chunks = tuple(StepChunk(c.uid, c.slot, c.start, len(c.tokens), c.sample, c.sampling)
                               for c in mb.chunks)
                step = Step(KIND_DATA, chunks, runner.bucket_for(len(tokens)))
                if channels is None:
                    results = runner.run(step, tokens=tokens)
                    inflight.append(_InFlight(mb, *runner.results_to_host(results)))
                    continue
                channels.send_table(step.to_table(cfg.batch_size))
                out = runner.run(step, tokens=tokens)
                channels.send_activations(out)
                buf = runner.results_buffer(step)
                inflight.append(_InFlight(mb, *runner.results_to_host(buf, channels.recv_results(buf))))
            if not inflight:
                if sched.done:
                    break
                continue
            finish(inflight.popleft())
    except PPRuntimeError as e:
        if channels is not None:
            text = encode_text(str(e))
            channels.send_table(Step(KIND_ABORT, (), text_len=text.numel()).to_table(cfg.batch_size), text)
        raise
    if channels is not None:
        channels.send_table(Step(KIND_STOP, ()).to_table(cfg.batch_size))
    return completions


def _serve(runner: StageRunner, channels: StageChannels, is_last: bool) -> None:
    while True:
        table = channels.recv_table()
        step = Step.from_table(table)
        if step.kind != KIND_DATA:
            text = channels.recv_text(step.text_len) if step.kind == KIND_ABORT else None
            if not is_last:
                channels.send_table(table, text)
            if text is not None:
                raise PPRuntimeError(decode_text(text))
            return
        if not is_last:
            channels.send_table(table)  # the next stage prepares while this one computes
        buf = runner.input_buffer(step)
        work = channels.recv_activations(buf)
        work.wait()  # on GPU the compute stream waits, not the host
        out = runner.run(step, x=buf)
        if is_last:
            channels.send_results(out)
        else:
            channels.send_activations(out)
