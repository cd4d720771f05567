"""Pipelined training benchmark: pp_runtime's Trainer against torch.distributed.pipelining, same blocks.

    torchrun --nproc_per_node=2 benchmarks/bench_train.py           # 2 GPUs, NCCL, bf16, Mistral-7B shape
    torchrun --nproc_per_node=2 benchmarks/bench_train.py --layers 2 --dim 64 --hidden 128 --heads 4 \\
        --kv-heads 2 --head-dim 16 --vocab 256 --seq 32 --microbatches 4 --steps 2   # CPU / gloo smoke run

One stage per process (world size = pipeline stages), stages split by `plan_for(..., training=True)`.
Every configuration trains the same StageModule blocks (same shapes, same seeded weights) on the
same synthetic batch: `--microbatches` rows of `--seq` random tokens per optimizer step, one row per
micro-batch, each row one document, so attention takes SDPA's plain causal (flash) path on both
sides. Configurations, run one after another in the same processes:

- ``ours-1f1b`` / ``ours-gpipe`` / ``ours-zb-h1``: `pp_runtime.trainer.Trainer` with our 1F1B,
  GPipe or ZB-H1 zero-bubble schedule (compared with torch's 1F1B: torch has no one-stage-per-rank
  zero-bubble schedule);
- ``torch-1f1b`` / ``torch-gpipe``: `torch.distributed.pipelining.PipelineStage` around the same
  StageModule (a wrapper supplies the fixed causal AttentionMeta) with `Schedule1F1B` /
  `ScheduleGPipe`. The loss is the same token-summed cross-entropy divided by the valid tokens of the
  step, and after the schedule the gradient path is the Trainer's own (global-norm clipping across
  stages, AdamW with decay on matrices, the same master-weight setting), so the two sides differ only
  in how the pipeline runs.

Each configuration runs `--warmup` untimed steps, then `--steps` timed steps, and reports
tokens/s (all tokens of a step over the wall time of the timed steps, slowest rank), MFU
(`trainer.flops_per_token` x tokens/s / (GPUs x `--peak-flops`)), the peak of
`torch.cuda.max_memory_allocated` on each GPU, and for our runtime the bubble measured from the
executor's recorded action times: per rank, 1 - (time inside its forward/backward actions) / (time
from the first action's start to the last action's end over all ranks), averaged over the timed
steps, next to the bubble on paper (the simulator's, with B = 2F and W = B/2 when split: (p-1)/(m+p-1)
for 1F1B and GPipe, (p-1)/(3m+p-1) for ZB-H1). `idle_of_step` is the same busy time against the whole
step (which also holds the gradient clipping and the optimizer step).

Mixed precision: parameters, activations and gradients in bf16 on GPU (float32 on CPU). By default
AdamW updates the bf16 parameters directly (states in bf16); `--master-weights` keeps float32
master weights, float32 gradients and float32 AdamW states, as `launch/finetune.py` does by default
(20 bytes per parameter instead of 8). Activation checkpointing is off unless
`--activation-checkpointing`. Either setting applies to both sides.

Memory (rough estimate, per GPU, 2 stages of 16 layers each): weights, gradients and optimizer state
take 29 GB with the default optimizer and 72 GB with `--master-weights`. Activations add about
0.4 GB per layer per held 2048-token micro-batch: 2 micro-batches on the first stage for 1F1B and
all 8 for GPipe. So the full 32 layers fit on 2x H200 by default (about 42 GB for 1F1B and 89 GB
for GPipe), and with `--master-weights` 1F1B fits (about 87 GB) but GPipe is marginal (about
130 GB): use `--layers 16` or `--activation-checkpointing` for that.

A configuration that fails while being built (out of memory, an API mismatch) is reported and the
run goes on with the next. One that fails while training (out of memory in a step, a hang) leaves
the peer process blocked in a communication, so the run stops there: rank 0 prints the failure and
the results so far, and the process group exits. Configurations whose estimated memory exceeds the
GPU are skipped beforehand (`--no-skip` runs them anyway); `--configs` picks which run.

Rank 0 prints one `RESULT {json}` line per configuration and finally a markdown summary.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.args import ModelArgs  # noqa: E402
from pp_runtime.attention_meta import build_training_meta  # noqa: E402
from pp_runtime.model import StageModule  # noqa: E402
from pp_runtime.parallel import ParallelContext, init_parallel, shutdown  # noqa: E402
from pp_runtime.partition import StageSpec, plan_for  # noqa: E402
from pp_runtime.schedules import build_schedule  # noqa: E402
from pp_runtime.simulator import simulate  # noqa: E402
from pp_runtime.train_data import Document, PackedDataset  # noqa: E402
from pp_runtime.trainer import PEAK_FLOPS_H200_BF16, TrainConfig, Trainer, flops_per_token, lr_at, token_loss  # noqa: E402

CONFIGS = ("ours-1f1b", "torch-1f1b", "ours-gpipe", "torch-gpipe", "ours-zb-h1")
LABELS = {
    "ours-1f1b": "pp_runtime 1F1B",
    "ours-gpipe": "pp_runtime GPipe",
    "ours-zb-h1": "pp_runtime ZB-H1",
    "torch-1f1b": "torch.distributed.pipelining Schedule1F1B",
    "torch-gpipe": "torch.distributed.pipelining ScheduleGPipe",
}
GB = 1e9


# ---------------------------------------------------------------------------------- helpers
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
    if bad:
        p.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    if a.steps < 1 or a.warmup < 0 or a.microbatches < 1 or a.seq < 2:
        p.error("need --steps >= 1, --warmup >= 0, --microbatches >= 1, --seq >= 2")
    return a


def sync(ctx: ParallelContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def gather(ctx: ParallelContext, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def free_memory(ctx: ParallelContext) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_memory_gb(ctx: ParallelContext) -> Optional[float]:
    if ctx.device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(ctx.device) / GB, 2)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe_error(e: BaseException) -> str:
    kind = "OOM" if is_oom(e) else type(e).__name__
    return f"{kind}: {' '.join(str(e).split())[:300]}"


def model_args(a: argparse.Namespace) -> ModelArgs:
    return ModelArgs(dim=a.dim, n_layers=a.layers, head_dim=a.head_dim, hidden_dim=a.hidden, n_heads=a.heads,
                     n_kv_heads=a.kv_heads, vocab_size=a.vocab, sliding_window=a.window,
                     max_seq_len=max(32768, a.seq))


def build_stage(margs: ModelArgs, spec: StageSpec, dtype: torch.dtype, device: torch.device, seed: int) -> StageModule:
    """The stage's blocks, allocated directly on the device and filled with seeded N(0, 0.02) (norms 1).

    Every configuration calls this with the same seed, so all train the same weights.
    """
    with torch.device("meta"):
        module = StageModule(margs, spec).to(dtype)
    module = module.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1009 + spec.index)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module


def synthetic_data(a: argparse.Namespace) -> PackedDataset:
    """`--microbatches` rows of `--seq` random tokens, one document per row (every step sees the same rows)."""
    rng = random.Random(a.seed)
    docs = [Document([rng.randrange(a.vocab) for _ in range(a.seq)], [True] * a.seq) for _ in range(a.microbatches)]
    return PackedDataset.from_documents(docs, a.seq, shuffle=False)


def stage_params(margs: ModelArgs, spec: StageSpec) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in StageModule(margs, spec).parameters())


def estimate_memory_gb(a: argparse.Namespace, margs: ModelArgs, spec: StageSpec, pp: int, schedule: str,
                       elem: int) -> float:
    """Rough peak for one stage: weights, gradients, optimizer state, held activations, logits."""
    n = stage_params(margs, spec)
    static = n * (elem + elem + (4 + 4 + 8 if a.master_weights else 2 * elem))
    transient = n * (4 if a.master_weights else elem)  # AdamW's foreach temporaries at the step
    m = a.microbatches
    held = {"gpipe": m, "zb-h1": min(m, pp)}.get(schedule, min(m, pp - spec.index))
    layers = spec.last - spec.first
    per_token_layer = elem * (margs.dim if a.activation_checkpointing else 4 * margs.hidden_dim + 11 * margs.dim)
    acts = held * layers * per_token_layer * a.seq
    if spec.has_head:
        acts += held * a.seq * margs.vocab_size * 4 * 3  # float32 logits, log-softmax, their gradient
    return (static + max(acts, transient)) / GB


# ---------------------------------------------------------------------------------- failure guard
class Guard:
    """Stops the whole run, with the results so far, when a configuration fails or hangs mid-training.

    A failed step leaves the peer blocked in a receive or a collective that never completes, so the
    failing rank posts the reason in the rendezvous store; a watcher thread on every rank sees it
    (or sees the configuration run past `--config-timeout`), rank 0 prints the failure and the
    summary, and every rank exits.
    """

    FAILED, PRINTED = "bench_train/failed", "bench_train/printed"

    def __init__(self, ctx: ParallelContext, limit_s: float, report: Callable[[str, Optional[str]], None]) -> None:
        self.ctx, self.limit_s, self.report = ctx, limit_s, report
        self.store = None
        if ctx.distributed:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - without a store, timeouts still stop the run
                self.store = None
        self.label: Optional[str] = None
        self.t0 = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def enter(self, label: str) -> None:
        self.label, self.t0 = label, time.monotonic()

    def leave(self) -> None:
        self.label = None

    def fail(self, msg: str) -> None:
        self._post(msg)
        self._abort(msg)

    def _post(self, msg: str) -> None:
        if self.store is not None:
            try:
                self.store.set(self.FAILED, msg)
            except Exception:  # noqa: BLE001
                pass

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            if self.store is not None:
                try:
                    if self.store.check([self.FAILED]):
                        self._abort(self.store.get(self.FAILED).decode())
                except Exception:  # noqa: BLE001 - the store goes away when a peer exits
                    pass
            label = self.label
            if label is not None and time.monotonic() - self.t0 > self.limit_s:
                msg = (f"{label}: still running after {self.limit_s:g} s on rank {self.ctx.rank} "
                       "(hung, or a peer failed); stopping")
                self._post(msg)
                self._abort(msg)

    def _abort(self, msg: str) -> None:
        if not self._lock.acquire(blocking=False):
            while True:
                time.sleep(60)  # another thread is already stopping the process
        if self.ctx.rank == 0:
            try:
                self.report(msg, self.label)
            finally:
                sys.stdout.flush()
                if self.store is not None:
                    try:
                        self.store.set(self.PRINTED, "1")
                    except Exception:  # noqa: BLE001
                        pass
        else:
            deadline = time.monotonic() + 20.0
            while self.store is not None and time.monotonic() < deadline:
                try:
                    if self.store.check([self.PRINTED]):
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


# ---------------------------------------------------------------------------------- configurations
class TorchPipeModule(nn.Module):
    """A StageModule as torch.distributed.pipelining wants it: one tensor in, one tensor out.

    The AttentionMeta is the one our runtime builds for a single-document row of `seq` tokens
    (plain causal, no mask), fixed because every micro-batch has that shape.
    """

    def __init__(self, stage: StageModule, meta) -> None:
        super().__init__()
        self.stage = stage
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x, self.meta, logits="all")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Bench:
    def __init__(self, a: argparse.Namespace, ctx: ParallelContext) -> None:
        self.a, self.ctx = a, ctx
        self.margs = model_args(a)
        self.pp = ctx.pp_size
        if a.dtype == "auto":
            self.dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, a.dtype)
        self.plan = plan_for(self.margs, self.pp, training=True)
        specs = self.plan.for_rank(ctx.pp_rank)
        assert len(specs) == 1
        self.spec = specs[0]
        self.data = synthetic_data(a)
        self.tokens_per_step = a.microbatches * a.seq
        self.fpt = flops_per_token(self.margs, a.seq)
        self.results: list[dict] = []
        self.gpu_mem_gb = (torch.cuda.get_device_properties(ctx.device).total_memory / GB
                           if ctx.device.type == "cuda" else None)
        fail = (a.fail or "").split(":")
        self.fail_at = (fail[0], int(fail[1]), len(fail) > 2 and fail[2] == "build") if a.fail else None

    # ------------------------------------------------------------------ common
    def train_config(self) -> TrainConfig:
        a = self.a
        return TrainConfig(steps=a.warmup + a.steps, batch_size=a.microbatches, lr=a.lr, min_lr=a.lr / 10,
                           warmup_steps=0, activation_checkpointing=a.activation_checkpointing,
                           master_weights=a.master_weights, peak_flops=a.peak_flops, log_every=10**9)

    def _maybe_inject(self, name: str, build: bool) -> None:
        if self.fail_at and self.fail_at[0] == name and self.fail_at[1] == self.ctx.rank and self.fail_at[2] == build:
            raise RuntimeError(f"injected failure (--fail {self.a.fail})")

    def _mfu(self, tps: float) -> Optional[float]:
        if self.ctx.device.type != "cuda":
            return None
        return tps * self.fpt / (self.ctx.world_size * self.a.peak_flops)

    def base_record(self, name: str) -> dict:
        impl, sched = name.split("-", 1)
        return {"config": name, "impl": "pp_runtime" if impl == "ours" else "torch.distributed.pipelining",
                "schedule": sched, "stages": self.pp, "microbatches": self.a.microbatches, "seq": self.a.seq,
                "layers": self.a.layers, "split": self.plan.split, "dtype": str(self.dtype).replace("torch.", ""),
                "master_weights": self.a.master_weights, "activation_checkpointing": self.a.activation_checkpointing,
                "bubble_formula": round(simulate(build_schedule(sched, self.pp, self.a.microbatches)).bubble_fraction, 4)}

    # ------------------------------------------------------------------ one configuration
    def run(self, name: str, guard: Guard) -> None:
        ctx, a = self.ctx, self.a
        rec = self.base_record(name)
        schedule_name = rec["schedule"]
        guard.enter(name)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        est = estimate_memory_gb(a, self.margs, self.spec, self.pp, schedule_name, elem)
        ests = gather(ctx, round(est, 1))
        if self.gpu_mem_gb is not None:
            rec["est_memory_gb"] = ests
            if max(ests) > 0.95 * self.gpu_mem_gb and not a.no_skip:
                rec.update(status="skipped", reason=(f"estimated {max(ests):.0f} GB per GPU > {self.gpu_mem_gb:.0f} GB "
                                                     "(--no-skip runs it anyway)"))
                self._emit(rec)
                guard.leave()
                return
        free_memory(ctx)
        # Build (errors here are agreed on by all ranks, and the run goes on).
        state: dict[str, Any] = {}
        err = None
        try:
            self._maybe_inject(name, build=True)
            (self._build_ours if name.startswith("ours") else self._build_torch)(schedule_name, state)
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
        """Measured bubble from the executor's per-action times of every timed step, all ranks."""
        ctx = self.ctx
        mine = [(min(s for _, s, _ in t), max(e for _, _, e in t), sum(e - s for _, s, e in t), dt)
                for t, dt in timings]
        everyone = gather(ctx, mine)  # [rank][step] -> (first start, last end, busy, step time)
        n_steps = len(mine)
        bubble = [0.0] * ctx.world_size
        idle = [0.0] * ctx.world_size
        for k in range(n_steps):
            window = max(r[k][1] for r in everyone) - min(r[k][0] for r in everyone)
            for rank, rows in enumerate(everyone):
                bubble[rank] += (1.0 - rows[k][2] / window) / n_steps
                idle[rank] += (1.0 - rows[k][2] / rows[k][3]) / n_steps
        out = {"bubble_measured": [round(b, 4) for b in bubble], "idle_of_step": [round(x, 4) for x in idle],
               "busy_s": [round(sum(r[k][2] for k in range(n_steps)) / n_steps, 4) for r in everyone]}
        if self.a.out:
            rows = gather(ctx, [(str(act), s, e) for act, s, e in self._last_timings])
            if ctx.rank == 0:
                try:
                    from pp_runtime.timeline import draw_timeline

                    path = Path(self.a.out) / f"timeline_{name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    draw_timeline(rows, path, title=f"{LABELS[name]}, last timed step (measured)", xlabel="seconds")
                    out["timeline"] = str(path)
                except Exception as e:  # noqa: BLE001 - the picture is optional
                    out["timeline_error"] = describe_error(e)
        return out

    # ------------------------------------------------------------------ ours
    def _build_ours(self, schedule_name: str, state: dict) -> None:
        ctx, a = self.ctx, self.a
        stage = build_stage(self.margs, self.spec, self.dtype, ctx.device, a.seed)
        schedule = build_schedule(schedule_name, self.pp, a.microbatches)
        trainer = Trainer(ctx, self.margs, schedule, {self.spec.index: stage}, self.data, self.train_config(),
                          metrics_path=None, console=False)
        state["trainer"] = trainer

        def step(i: int) -> tuple[float, Any]:
            stats = trainer.step()
            self._last_timings = stats.timings
            return stats.loss, (stats.timings, stats.step_time_s)

        state["step"] = step

    # ------------------------------------------------------------------ torch.distributed.pipelining
    def _build_torch(self, schedule_name: str, state: dict) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        ctx, a, m = self.ctx, self.a, self.margs
        stage = build_stage(m, self.spec, self.dtype, ctx.device, a.seed)
        # The Trainer is used only for its gradient path (clip, master weights, AdamW); its executor stays idle.
        trainer = Trainer(ctx, m, build_schedule(schedule_name, self.pp, a.microbatches), {self.spec.index: stage},
                          self.data, self.train_config(), metrics_path=None, console=False)
        meta = build_training_meta([[a.seq]], window=m.sliding_window, head_dim=m.head_dim, rope_theta=m.rope_theta,
                                   n_kv_groups=m.n_heads // m.n_kv_heads, device=ctx.device)
        module = TorchPipeModule(stage, meta)
        dev, seq = ctx.device, a.seq
        # Static shapes of one micro-batch (meta tensors: nothing allocated); activations carry
        # requires_grad so that gradients flow back to the previous stage.
        meta_dev = torch.device("meta")
        if self.spec.has_embedding:
            example_in = torch.empty(seq, dtype=torch.long, device=meta_dev)
        else:
            example_in = torch.empty(seq, m.dim, dtype=self.dtype, device=meta_dev, requires_grad=True)
        if self.spec.has_head:
            example_out = torch.empty(seq, m.vocab_size, dtype=torch.float32, device=meta_dev, requires_grad=True)
        else:
            example_out = torch.empty(seq, m.dim, dtype=self.dtype, device=meta_dev, requires_grad=True)
        try:
            pstage = PipelineStage(module, self.spec.index, self.pp, dev, input_args=(example_in,),
                                   output_args=(example_out,), group=ctx.pp_group)
            static = True
        except Exception:  # noqa: BLE001 - a torch that wants no example shapes infers them in the first step
            pstage = PipelineStage(module, self.spec.index, self.pp, dev, group=ctx.pp_group)
            static = False
        batch = self.data.batch(0, a.microbatches)
        n_valid = batch.n_valid
        scale = 1.0 / max(n_valid, 1)

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return token_loss(logits, targets) * scale

        cls = Schedule1F1B if schedule_name == "1f1b" else ScheduleGPipe
        kw = {"loss_fn": loss_fn}
        if _accepts(cls.__init__, "scale_grads"):
            kw["scale_grads"] = False  # the loss is already divided by the step's valid tokens
        sched = cls(pstage, a.microbatches, **kw)
        step_kw = {"return_outputs": False} if _accepts(sched.step, "return_outputs") else {}
        state["options"] = {"scale_grads": kw.get("scale_grads"), "return_outputs": step_kw.get("return_outputs"),
                            "static_shapes": static}
        tokens = batch.tokens.reshape(-1).to(dev)  # [m * seq]: split into m micro-batches of one row
        targets = batch.targets.reshape(-1).to(dev)
        state.update(trainer=trainer, pstage=pstage, sched=sched, module=module)
        first, last = self.spec.has_embedding, self.spec.has_head
        tcfg = trainer.cfg

        def step(i: int) -> tuple[float, Any]:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            for _, p in trainer.named_params:
                p.grad = None
            losses: list = []
            if first:
                sched.step(tokens, **step_kw)
            elif last:
                sched.step(target=targets, losses=losses, **step_kw)
            else:
                sched.step(**step_kw)
            # From here on, exactly the Trainer's step after its executor ran.
            trainer._reduce_gradients()
            trainer._clip()
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr_at(i, tcfg)
            trainer.optimizer.step()
            if trainer.master:
                with torch.no_grad():
                    torch._foreach_copy_([p for _, p in trainer.named_params], [mp for _, mp in trainer.opt_params])
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            for x in losses:
                loss_sum += x.detach().to(torch.float64)
            if ctx.distributed:
                dist.all_reduce(loss_sum)
            return float(loss_sum), None

        state["step"] = step

    # ------------------------------------------------------------------ report
    def header(self) -> str:
        a, m = self.a, self.margs
        dev = torch.cuda.get_device_name(self.ctx.device) if self.ctx.device.type == "cuda" else "CPU"
        backend = dist.get_backend() if self.ctx.distributed else "none"
        opt = ("AdamW with float32 master weights, gradients and states" if a.master_weights
               else f"AdamW directly on the {str(self.dtype).replace('torch.', '')} parameters (no master weights)")
        return (f"{self.ctx.world_size} x {dev}, {backend}, torch {torch.__version__}; model dim {m.dim}, hidden {m.hidden_dim}, "
                f"{m.n_heads} heads / {m.n_kv_heads} kv heads x {m.head_dim}, vocab {m.vocab_size}, window {m.sliding_window}, "
                f"{m.n_layers} layers split {self.plan.split}; {str(self.dtype).replace('torch.', '')}; {opt}; "
                f"activation checkpointing {'on' if a.activation_checkpointing else 'off'}; "
                f"{a.microbatches} micro-batches of 1 x {a.seq} tokens per step; {a.warmup} warm-up + {a.steps} timed steps; "
                f"MFU against {a.peak_flops / 1e12:.0f} TFLOP/s per GPU, {self.fpt / 1e9:.2f} GFLOP per token")

    def summary(self, note: str = "") -> str:
        lines = ["", "## Summary", "", self.header(), ""]
        lines += ["| configuration | tokens/s | MFU | step (s) | peak memory per GPU (GB, 1e9 B) | measured bubble per rank | bubble on paper | loss (first, last) |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {r["config"]: r for r in self.results}
        for name in self.a.configs:
            r = by.get(name)
            if r is None:
                lines.append(f"| {LABELS[name]} | not run | | | | | | |")
                continue
            if r.get("status") != "ok":
                why = r.get("reason") or r.get("error") or ""
                lines.append(f"| {LABELS[name]} | {r['status']}: {why[:160]} | | | {_fmt_list(r.get('peak_memory_gb'))} | | | |")
                continue
            mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            bub = ", ".join(f"{100 * b:.1f}%" for b in r["bubble_measured"]) if "bubble_measured" in r else "n/a"
            form = f"{100 * r['bubble_formula']:.1f}%"
            losses = r.get("losses") or []
            lossr = f"{losses[0]:.4f}, {losses[-1]:.4f}" if losses else ""
            lines.append(f"| {LABELS[name]} | {r['tokens_per_s']:,.0f} | {mfu} | {r['step_time_s']:.3f} | "
                         f"{_fmt_list(r.get('peak_memory_gb'))} | {bub} | {form} | {lossr} |")
        pairs = [("1F1B", "ours-1f1b", "torch-1f1b"), ("GPipe", "ours-gpipe", "torch-gpipe"),
                 ("ZB-H1 (ours) / 1F1B (torch)", "ours-zb-h1", "torch-1f1b")]
        ratio_lines = []
        for sched, ours, theirs in pairs:
            o, t = by.get(ours), by.get(theirs)
            if o and t and o.get("status") == "ok" and t.get("status") == "ok":
                mem = ""
                if o.get("peak_memory_gb") and t.get("peak_memory_gb") and None not in o["peak_memory_gb"] + t["peak_memory_gb"]:
                    mem = f"{max(o['peak_memory_gb']) / max(t['peak_memory_gb']):.2f}"
                ratio_lines.append(f"| {sched} | {o['tokens_per_s'] / t['tokens_per_s']:.3f} | {mem} |")
        if ratio_lines:
            lines += ["", "| schedule | tokens/s ours / torch.distributed.pipelining | peak memory ours / torch (max over GPUs) |",
                      "|---|---|---|", *ratio_lines]
        if note:
            lines += ["", f"Stopped early: {note}"]
        return "\n".join(lines)


def _fmt_list(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return " / ".join("n/a" if x is None else f"{x:.1f}" for x in v)
    return f"{v:.1f}"


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    ctx = init_parallel(stages=None, data_parallel=1, device=a.device)
    if ctx.pp_size < 2:
        print("run with torchrun --nproc_per_node=N (N >= 2): one pipeline stage per process", file=sys.stderr)
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
        _write_json(a, bench, note)

    guard = Guard(ctx, a.config_timeout, report)
    if ctx.rank == 0:
        print(bench.header(), flush=True)
        print(f"stages: {bench.plan.describe()}", flush=True)
    for name in a.configs:
        if ctx.rank == 0:
            print(f"--- {LABELS[name]}", flush=True)
        bench.run(name, guard)
    if ctx.rank == 0:
        print(bench.summary(), flush=True)
        _write_json(a, bench, "")
    shutdown()
    return 0


def _write_json(a: argparse.Namespace, bench: Bench, note: str) -> None:
    if not a.out:
        return
    path = Path(a.out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": bench.header(), "results": bench.results, "note": note}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
