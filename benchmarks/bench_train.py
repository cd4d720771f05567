"""Pipelined training benchmark: pp_runtime's Trainer against torch.distributed.pipelining and
DeepSpeed's pipeline engine, same blocks, same weights, same batch.

    torchrun --nproc_per_node=2 benchmarks/bench_train.py           # 2 GPUs, NCCL, bf16, Mistral-7B shape
    torchrun --nproc_per_node=2 benchmarks/bench_train.py --layers 4 --dim 64 --hidden 128 --heads 4 \\
        --kv-heads 2 --head-dim 16 --vocab 256 --seq 32 --microbatches 4 --steps 2   # CPU / gloo smoke run

One process per pipeline rank (world size = ranks). Every configuration trains the same StageModule
blocks (same shapes, same seeded weights) on the same synthetic batch: `--microbatches` rows of
`--seq` random tokens per optimizer step, one row per micro-batch, each row one document, so
attention takes SDPA's plain causal (flash) path on every side. Stages are split by
`plan_for(..., training=True)` in the placement of the schedule (one stage per rank; two per rank
looped for the interleaved schedules; two per rank in a V for ZB-V and DualPipeV). Configurations,
run one after another in the same processes (`--configs` picks):

- ``ours-*``: `pp_runtime.training.trainer.Trainer` with our 1F1B, GPipe, ZB-H1, interleaved 1F1B (v=2),
  interleaved 1F1B with the B/W split (v=2) or ZB-V schedule;
- ``torch-*``: `torch.distributed.pipelining` with Schedule1F1B, ScheduleGPipe,
  ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble and
  ScheduleDualPipeV (`train_torch_peer.py`; a class this torch lacks is reported as skipped);
- ``deepspeed-1f1b``: DeepSpeed's PipelineModule / pipeline engine (`train_deepspeed_peer.py`),
  skipped with a note when deepspeed is not importable.

The loss is the same token-summed cross-entropy divided by the valid tokens of the step on every
side, and so are the gradient clipping (global norm across stages) and AdamW (decay on matrices,
fused on GPU, the same master-weight setting): the configurations differ only in how the pipeline
runs.

Each configuration runs `--warmup` untimed steps, then `--steps` timed steps, and reports tokens/s
(all tokens of a step over the wall time of the timed steps, slowest rank), MFU
(`trainer.flops_per_token` x tokens/s / (GPUs x `--peak-flops`)), the peak of
`torch.cuda.max_memory_allocated` on each GPU, the ratio to the best peer of the run, and for our
runtime and torch's the time spent outside the schedule (gradient reduction, clipping, optimizer)
and the bubble measured from per-action times (our executor's records; CUDA events around torch's
per-micro-batch forward and backward): per rank, 1 - (time inside its actions) / (time from the
first action's start to the last action's end over all ranks), averaged over the timed steps, next
to the bubble on paper (the simulator's, with B = 2F and W = B/2 when split). `idle_of_step` is the
same busy time against the whole step. `action_ms` is the mean time of each kind of action per
stage and rank, `idle_ms` each rank's idle time in the schedule's window split into fill (before
its first action), between actions (waiting for a peer) and drain (after its last); with `--out`,
`actions_CONFIG.json` holds every action's times ([rank][step] lists of (action, start, end)).

Mixed precision: parameters, activations and gradients in bf16 on GPU (float32 on CPU). By default
AdamW updates the bf16 parameters directly (states in bf16); `--master-weights` keeps float32
master weights, float32 gradients and float32 AdamW states, as `launch/finetune.py` does by default
(20 bytes per parameter instead of 8). Activation checkpointing is off unless
`--activation-checkpointing`. Either setting applies to every side.

A configuration that fails while being built (out of memory, an API mismatch) is reported and the
run goes on with the next. One that fails while training (out of memory in a step, a hang) leaves
the peer process blocked in a communication, so the run stops there: rank 0 prints the failure and
the results so far, and the process group exits. Configurations whose estimated memory exceeds the
GPU are skipped beforehand (`--no-skip` runs them anyway).

Rank 0 prints one `RESULT {json}` line per configuration and finally a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from train_common import (GB, Guard, allocated_gb, barrier, build_stage, describe_error, estimate_memory_gb, free_memory, gather,
                          is_oom, model_args, peak_memory_gb, sync, synthetic_data)
import train_report
from pp_runtime.distributed.parallel import ParallelContext, init_parallel, shutdown
from pp_runtime.model.partition import StagePlan, plan_for
from pp_runtime.training.schedules import Schedule, build_schedule
from pp_runtime.training.simulator import simulate
from pp_runtime.training.trainer import PEAK_FLOPS_H200_BF16, TrainConfig, Trainer, flops_per_token


@dataclass(frozen=True)
class Config:
    """One configuration: who runs the pipeline, and our schedule of the same shape (which gives
    the stage placement, the number of stages per rank and the bubble on paper)."""

    name: str
    impl: str  # pp_runtime, torch.distributed.pipelining or deepspeed
    schedule: str
    virtual: int
    label: str
    peer_class: Optional[str] = None  # torch's schedule class


TORCH, DEEPSPEED = "torch.distributed.pipelining", "deepspeed"
CONFIGS = {c.name: c for c in (
    Config("ours-1f1b", "pp_runtime", "1f1b", 1, "pp_runtime 1F1B"),
    Config("torch-1f1b", TORCH, "1f1b", 1, "torch Schedule1F1B", "Schedule1F1B"),
    Config("deepspeed-1f1b", DEEPSPEED, "1f1b", 1, "DeepSpeed pipeline engine (1F1B)"),
    Config("ours-gpipe", "pp_runtime", "gpipe", 1, "pp_runtime GPipe"),
    Config("torch-gpipe", TORCH, "gpipe", 1, "torch ScheduleGPipe", "ScheduleGPipe"),
    Config("ours-zb-h1", "pp_runtime", "zb-h1", 1, "pp_runtime ZB-H1"),
    Config("ours-interleaved", "pp_runtime", "interleaved", 2, "pp_runtime interleaved 1F1B (v=2)"),
    Config("torch-interleaved", TORCH, "interleaved", 2, "torch ScheduleInterleaved1F1B (v=2)", "ScheduleInterleaved1F1B"),
    Config("ours-interleaved-zb", "pp_runtime", "interleaved-zb", 2, "pp_runtime interleaved 1F1B + B/W split (v=2)"),
    Config("torch-interleaved-zb", TORCH, "interleaved-zb", 2, "torch ScheduleInterleavedZeroBubble (v=2)",
           "ScheduleInterleavedZeroBubble"),
    Config("ours-zbv", "pp_runtime", "zb-v", 2, "pp_runtime ZB-V"),
    Config("torch-zbv", TORCH, "zb-v", 2, "torch ScheduleZBVZeroBubble", "ScheduleZBVZeroBubble"),
    Config("torch-dualpipev", TORCH, "zb-v", 2, "torch ScheduleDualPipeV", "ScheduleDualPipeV"),
)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (defaults: Mistral 7B)")
    g.add_argument("--layers", type=int, default=32, help="total transformer layers, split over the stages")
    g.add_argument("--dim", type=int, default=4096)
    g.add_argument("--hidden", type=int, default=14336)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--head-dim", type=int, default=128)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--window", type=int, default=4096, help="sliding window")
    g = p.add_argument_group("run")
    g.add_argument("--seq", type=int, default=2048, help="tokens per row (one row per micro-batch)")
    g.add_argument("--microbatches", type=int, default=8)
    g.add_argument("--steps", type=int, default=6, help="timed optimizer steps per configuration")
    g.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    g.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    g.add_argument("--master-weights", action="store_true",
                   help="float32 master weights, gradients and AdamW states (default: AdamW on the bf16 parameters)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--peak-flops", type=float, default=PEAK_FLOPS_H200_BF16, help="per GPU, for MFU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-skip", action="store_true", help="run configurations even when the memory estimate exceeds the GPU")
    g.add_argument("--config-timeout", type=float, default=240.0,
                   help="seconds one configuration may take before the run is stopped as hung")
    g.add_argument("--out", default=None, help="folder for results.json and measured timeline PNGs (rank 0)")
    g.add_argument("--fail", default=None, metavar="CONFIG:RANK[:build]",
                   help="testing: raise in CONFIG on RANK, during a training step (or while building)")
    a = p.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in CONFIGS]
    # DeepSpeed's engine leaves memory allocated once dropped (22 GB on the last of 2 ranks at the 7B
    # shape), which would count in every later configuration's peak: it runs last
    a.configs.sort(key=lambda c: c in CONFIGS and CONFIGS[c].impl == DEEPSPEED)
    if bad:
        p.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    if a.steps < 1 or a.warmup < 0 or a.microbatches < 1 or a.seq < 2:
        p.error("need --steps >= 1, --warmup >= 0, --microbatches >= 1, --seq >= 2")
    return a


def action_stats(rows: list) -> dict:
    """Where each rank's time goes, from the per-action (label, start, end) rows [rank][step][action]
    of the timed steps: the mean time of each kind of action per stage ("F@0": ms), and each rank's
    idle time in the schedule's window (first start to last end over all ranks) split into the fill
    (before its first action), the gaps between its actions, and the drain (after its last one)."""
    n_ranks, n_steps = len(rows), len(rows[0])
    durations: list[dict[str, list[float]]] = [{} for _ in rows]
    idle = [{"fill": 0.0, "between": 0.0, "drain": 0.0} for _ in rows]
    window = 0.0
    for k in range(n_steps):
        w0 = min(s for r in rows for _, s, _ in r[k])
        w1 = max(e for r in rows for _, _, e in r[k])
        window += (w1 - w0) / n_steps
        for rank, r in enumerate(rows):
            acts = sorted(r[k], key=lambda x: x[1])
            idle[rank]["fill"] += (acts[0][1] - w0) / n_steps
            idle[rank]["drain"] += (w1 - acts[-1][2]) / n_steps
            idle[rank]["between"] += sum(max(0.0, b[1] - a[2]) for a, b in zip(acts, acts[1:])) / n_steps
            for label, s, e in acts:
                key = f"{label[0]}@{label.split('@')[1]}"
                durations[rank].setdefault(key, []).append(e - s)
    return {"schedule_window_s": round(window, 4),
            "action_ms": [{key: round(1e3 * sum(v) / len(v), 2) for key, v in sorted(d.items(), key=lambda kv: (
                int(kv[0].split("@")[1]), "FBW".index(kv[0][0])))} for d in durations],
            "action_ms_per_step": [{kind: round(1e3 * sum(sum(v) for key, v in d.items() if key[0] == kind) / n_steps, 1)
                                    for kind in "FBW" if any(key[0] == kind for key in d)} for d in durations],
            "idle_ms": [{key: round(1e3 * v, 1) for key, v in x.items()} for x in idle]}


class Bench:
    def __init__(self, a: argparse.Namespace, ctx: ParallelContext) -> None:
        self.a, self.ctx = a, ctx
        self.margs = model_args(a)
        self.pp = ctx.pp_size
        if a.dtype == "auto":
            self.dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, a.dtype)
        self.data = synthetic_data(a)
        self.tokens_per_step = a.microbatches * a.seq
        self.fpt = flops_per_token(self.margs, a.seq)
        self.results: list[dict] = []
        self.gpu_mem_gb = (torch.cuda.get_device_properties(ctx.device).total_memory / GB
                           if ctx.device.type == "cuda" else None)
        fail = (a.fail or "").split(":")
        self.fail_at = (fail[0], int(fail[1]), len(fail) > 2 and fail[2] == "build") if a.fail else None
        self._last_timings: list = []

    # ------------------------------------------------------------------ common
    def schedule_of(self, config: Config) -> Schedule:
        return build_schedule(config.schedule, self.pp, self.a.microbatches, config.virtual)

    def plan_of(self, config: Config) -> StagePlan:
        schedule = self.schedule_of(config)
        return plan_for(self.margs, self.pp, virtual_stages=schedule.virtual_stages, training=True,
                        stage_ranks=schedule.stage_ranks)

    def train_config(self) -> TrainConfig:
        a = self.a
        return TrainConfig(steps=a.warmup + a.steps, batch_size=a.microbatches, lr=a.lr, min_lr=a.lr / 10,
                           warmup_steps=0, activation_checkpointing=a.activation_checkpointing,
                           master_weights=a.master_weights)

    def _maybe_inject(self, name: str, build: bool) -> None:
        if self.fail_at and self.fail_at[0] == name and self.fail_at[1] == self.ctx.rank and self.fail_at[2] == build:
            raise RuntimeError(f"injected failure (--fail {self.a.fail})")

    def _mfu(self, tps: float) -> Optional[float]:
        if self.ctx.device.type != "cuda":
            return None
        return tps * self.fpt / (self.ctx.world_size * self.a.peak_flops)

    def base_record(self, name: str) -> dict:
        c, a = CONFIGS[name], self.a
        paper = None if c.peer_class == "ScheduleDualPipeV" else round(simulate(self.schedule_of(c)).bubble_fraction, 4)
        return {"config": name, "impl": c.impl, "schedule": c.peer_class or c.schedule, "stages": self.pp,
                "microbatches": a.microbatches, "seq": a.seq, "layers": a.layers, "split": self.plan_of(c).split,
                "dtype": str(self.dtype).replace("torch.", ""), "master_weights": a.master_weights,
                "activation_checkpointing": a.activation_checkpointing, "bubble_formula": paper}

    # ------------------------------------------------------------------ one configuration
    def run(self, name: str, guard: Guard) -> None:
        ctx, a, config = self.ctx, self.a, CONFIGS[name]
        rec = self.base_record(name)
        guard.enter(name)
        why_not = self._unavailable(config)
        if why_not is None and self.gpu_mem_gb is not None:
            elem = torch.tensor([], dtype=self.dtype).element_size()
            held = simulate(self.schedule_of(config)).peak_activations[ctx.pp_rank]
            specs = self.plan_of(config).for_rank(ctx.pp_rank)
            ests = gather(ctx, round(estimate_memory_gb(a, self.margs, specs, held, elem), 1))
            rec["est_memory_gb"] = ests
            if max(ests) > 0.95 * self.gpu_mem_gb and not a.no_skip:
                why_not = f"estimated {max(ests):.0f} GB per GPU > {self.gpu_mem_gb:.0f} GB (--no-skip runs it anyway)"
        if why_not is not None:
            if ctx.rank == 0:
                print(f"note: {name} skipped: {why_not}", flush=True)
            rec.update(status="skipped", reason=why_not)
            self._emit(rec)
            guard.leave()
            return
        free_memory(ctx)
        # what earlier configurations left allocated (it counts in this one's peak): should be ~0
        rec["allocated_at_start_gb"] = gather(ctx, allocated_gb(ctx))
        # Build (errors here are agreed on by all ranks, and the run goes on).
        state: dict[str, Any] = {}
        err = None
        try:
            self._maybe_inject(name, build=True)
            self._build(config, state)
        except Exception as e:  # noqa: BLE001 - reported, then the next configuration runs
            err = f"rank {ctx.rank}: {describe_error(e)}"
        errs = [e for e in gather(ctx, err) if e]
        if errs:
            state.clear()
            free_memory(ctx)
            rec.update(status="oom" if "OOM" in errs[0] else "error", phase="build", error="; ".join(errs))
            self._emit(rec)
            barrier(ctx)
            guard.leave()
            return
        # Train (a failure here stops the run: a peer is blocked in a communication).
        try:
            stats = self._train(name, state)
        except Exception as e:  # noqa: BLE001
            rec.update(status="oom" if is_oom(e) else "error", phase="train",
                       error=f"rank {ctx.rank}: {describe_error(e)}", peak_memory_gb=peak_memory_gb(ctx))
            self.results.append(rec)
            guard.fail(json.dumps(rec))
            return
        rec.update(stats)
        if "options" in state:
            rec["torch_options"] = state["options"]
        rec["peak_memory_gb"] = gather(ctx, peak_memory_gb(ctx))
        state.clear()
        free_memory(ctx)
        barrier(ctx)
        guard.leave()
        self._emit(rec)

    @staticmethod
    def _unavailable(config: Config) -> Optional[str]:
        """Why a peer cannot run in this environment (same answer on every rank), or None."""
        if config.impl == DEEPSPEED:
            from train_deepspeed_peer import unavailable

            return unavailable()
        if config.impl == TORCH:
            from train_torch_peer import schedule_class

            if schedule_class(config.peer_class) is None:
                return f"torch {torch.__version__} has no {config.peer_class}"
        return None

    def _build(self, config: Config, state: dict) -> None:
        if config.impl == "pp_runtime":
            self._build_ours(config, state)
        elif config.impl == TORCH:
            from train_torch_peer import build_torch

            build_torch(self, config, state)
        else:
            from train_deepspeed_peer import build_deepspeed

            build_deepspeed(self, config, state)

    def _emit(self, rec: dict) -> None:
        self.results.append(rec)
        if self.ctx.rank == 0:
            print("RESULT " + json.dumps(rec), flush=True)

    def _train(self, name: str, state: dict) -> dict:
        ctx, a = self.ctx, self.a
        step: Callable[[int], tuple[float, Any]] = state["step"]
        losses, step_times, timings = [], [], []
        for i in range(a.warmup):
            loss, _ = step(i)
            losses.append(loss)
        barrier(ctx)
        sync(ctx)
        t0 = time.perf_counter()
        for i in range(a.warmup, a.warmup + a.steps):
            if i == a.warmup + a.steps - 1:
                self._maybe_inject(name, build=False)
            s0 = time.perf_counter()
            loss, extra = step(i)
            sync(ctx)
            step_times.append(time.perf_counter() - s0)
            losses.append(loss)
            if extra is not None:
                timings.append(extra)
        elapsed = max(gather(ctx, time.perf_counter() - t0))
        tps = a.steps * self.tokens_per_step / elapsed
        mfu = self._mfu(tps)
        out = {"status": "ok", "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 4),
               "step_time_s": round(elapsed / a.steps, 4), "step_times_s": [round(t, 4) for t in step_times],
               "losses": [round(x, 5) for x in losses]}
        if timings:
            out.update(self._bubble(name, timings))
        return out

    def _bubble(self, name: str, timings: list) -> dict:
        """Measured bubble from the executor's per-action times of every timed step, all ranks, and
        the step time outside the schedule (slowest rank)."""
        ctx = self.ctx
        mine = [(min(s for _, s, _ in t), max(e for _, _, e in t), sum(e - s for _, s, e in t), dt)
                for t, dt, _ in timings]
        everyone = gather(ctx, mine)  # [rank][step] -> (first start, last end, busy, step time)
        n_steps = len(mine)
        bubble = [0.0] * ctx.world_size
        idle = [0.0] * ctx.world_size
        for k in range(n_steps):
            window = max(r[k][1] for r in everyone) - min(r[k][0] for r in everyone)
            for rank, rows in enumerate(everyone):
                bubble[rank] += (1.0 - rows[k][2] / window) / n_steps
                idle[rank] += (1.0 - rows[k][2] / rows[k][3]) / n_steps
        outside = max(gather(ctx, sum(dt - ph.get("schedule", 0.0) for _, dt, ph in timings) / n_steps))
        out = {"bubble_measured": [round(b, 4) for b in bubble], "idle_of_step": [round(x, 4) for x in idle],
               "busy_s": [round(sum(r[k][2] for k in range(n_steps)) / n_steps, 4) for r in everyone],
               "outside_schedule_s": round(outside, 4), "phases_s": {k: round(v, 5) for k, v in timings[-1][2].items()}}
        all_rows = gather(ctx, [[(str(act), s, e) for act, s, e in t] for t, _, _ in timings])  # [rank][step][action]
        out.update(action_stats(all_rows))
        if self.a.out and ctx.rank == 0:
            path = Path(self.a.out) / f"actions_{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(all_rows))
        if self.a.out:
            rows = gather(ctx, [(str(act), s, e) for act, s, e in self._last_timings])
            if ctx.rank == 0:
                try:
                    from pp_runtime.training.timeline import draw_timeline

                    path = Path(self.a.out) / f"timeline_{name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    draw_timeline(rows, path, title=f"{CONFIGS[name].label}, last timed step (measured)",
                                  xlabel="seconds", schedule=self.schedule_of(CONFIGS[name]))
                    out["timeline"] = str(path)
                except Exception as e:  # noqa: BLE001 - the picture is optional
                    out["timeline_error"] = describe_error(e)
        return out

    # ------------------------------------------------------------------ ours
    def _build_ours(self, config: Config, state: dict) -> None:
        ctx, a = self.ctx, self.a
        specs = self.plan_of(config).for_rank(ctx.pp_rank)
        stages = {spec.index: build_stage(self.margs, spec, self.dtype, ctx.device, a.seed) for spec in specs}
        trainer = Trainer(ctx, self.margs, self.schedule_of(config), stages, self.data, self.train_config(),
                          metrics_path=None, console=False)
        state["trainer"] = trainer

        def step(i: int) -> tuple[float, Any]:
            stats = trainer.step()
            self._last_timings = stats.timings
            return stats.loss, (stats.timings, stats.step_time_s, stats.phases)

        state["step"] = step

    # ------------------------------------------------------------------ report
    def header(self) -> str:
        a, m = self.a, self.margs
        dev = torch.cuda.get_device_name(self.ctx.device) if self.ctx.device.type == "cuda" else "CPU"
        backend = dist.get_backend() if self.ctx.distributed else "none"
        opt = ("AdamW with float32 master weights, gradients and states" if a.master_weights
               else f"AdamW directly on the {str(self.dtype).replace('torch.', '')} parameters (no master weights)")
        splits = sorted({f"{c.virtual} per rank: {self.plan_of(c).split}" for c in map(CONFIGS.get, a.configs)})
        return (f"{self.ctx.world_size} x {dev}, {backend}, torch {torch.__version__}; model dim {m.dim}, hidden {m.hidden_dim}, "
                f"{m.n_heads} heads / {m.n_kv_heads} kv heads x {m.head_dim}, vocab {m.vocab_size}, window {m.sliding_window}, "
                f"{m.n_layers} layers, stages {'; '.join(splits)}; {str(self.dtype).replace('torch.', '')}; {opt}; "
                f"activation checkpointing {'on' if a.activation_checkpointing else 'off'}; "
                f"{a.microbatches} micro-batches of 1 x {a.seq} tokens per step; {a.warmup} warm-up + {a.steps} timed steps; "
                f"MFU against {a.peak_flops / 1e12:.0f} TFLOP/s per GPU, {self.fpt / 1e9:.2f} GFLOP per token")

    def summary(self, note: str = "") -> str:
        return train_report.summary(self.header(), [CONFIGS[n] for n in self.a.configs], self.results, note)



def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    ctx = init_parallel(stages=None, data_parallel=1, device=a.device)
    if ctx.pp_size < 2:
        print("run with torchrun --nproc_per_node=N (N >= 2): one pipeline rank per process", file=sys.stderr)
        return 2
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // ctx.world_size))
    # Initialise the pipeline group's communicator with every rank taking part, before any P2P on it.
    warm = torch.zeros(1, device=ctx.device)
    dist.all_reduce(warm, group=ctx.pp_group)
    sync(ctx)
    bench = Bench(a, ctx)

    def report(note: str, running: Optional[str]) -> None:
        try:
            rec = json.loads(note)
        except (ValueError, TypeError):
            rec = None
        if isinstance(rec, dict) and "config" in rec:
            note = f"{rec['config']} failed while training ({rec.get('error')}); later configurations were not run"
        elif running is not None:
            rec = {**bench.base_record(running), "status": "stopped", "phase": "train", "error": note}
            note = f"{note}; later configurations were not run"
        if isinstance(rec, dict) and "config" in rec:
            bench.results = [r for r in bench.results if r.get("config") != rec["config"]] + [rec]
            print("RESULT " + json.dumps(rec), flush=True)
        print(bench.summary(note), flush=True)
        train_report.write_json(a.out, bench.header(), bench.results, note)

    guard = Guard(ctx, a.config_timeout, report)
    if ctx.rank == 0:
        print(bench.header(), flush=True)
    for name in a.configs:
        if ctx.rank == 0:
            print(f"--- {CONFIGS[name].label}", flush=True)
            print(bench.plan_of(CONFIGS[name]).describe(), flush=True)
        bench.run(name, guard)
    if ctx.rank == 0:
        print(bench.summary(), flush=True)
        train_report.write_json(a.out, bench.header(), bench.results, "")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
