"""One optimizer step = one run of the pipeline schedule over the step's micro-batches.

The loss of a step is the sum of the token cross-entropies over all its micro-batches and all
data-parallel replicas, divided by the number of valid target tokens in that whole step (not a
mean of per-micro-batch means). Every rank holds the same packed data, so each knows that count
without communicating, and scales its micro-batch losses by it before the backward. Then:

1. gradients are summed across data-parallel replicas (`dp_group`);
2. the global gradient norm over all stages is the square root of the all-reduced sum of the
   stages' squared norms (`pp_group`); as the replicas hold equal gradients it is the same
   everywhere, and gradients are clipped by it;
3. AdamW (decay on matrices only) with linear warmup and cosine decay of the learning rate;
   fused into one kernel per step on GPU.

Each step's time is split into phases (building the micro-batches, the schedule, the gradient
reduction, clipping, the optimizer, the loss bookkeeping), reported next to the step time in
the console line and metrics.jsonl (`schedule_s`, `optimizer_s`, ...): what a pipeline schedule
cannot hide shows outside `schedule_s`.

With a bfloat16/float16 model the optimizer keeps float32 master weights (gradients are
accumulated in the model dtype, then copied to float32 for clipping and the update). Parameters
that do not require a gradient (LoRA's frozen base weights, `pp_runtime.training.lora`) are left out of all
of it: no gradient, no master copy, no optimizer state, not in checkpoints.

`train.zero=1` shards the master weights and AdamW state over the replicas (steps 1 and 3 become
a reduce-scatter, a slice update and an all-gather), `train.optimizer=cpu_adam` moves them to host
memory under DeepSpeed's CPU Adam; both run the flat step of pp_runtime/training/optim_sharding.py, with
the same loss, norm and clipping.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pp_runtime.distributed.comm import EdgeLinks
from pp_runtime.distributed.parallel import ParallelContext, edge_groups
from pp_runtime.errors import ConfigError, TrainingError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.moe import ExpertLoad, expert_token_counts
from pp_runtime.model.transformer import StageModule
from pp_runtime.training.data import IGNORE, Batch, PackedDataset, check_batch_shape
from pp_runtime.training.executor import MicroBatch, PipelineExecutor, pipeline_edges
from pp_runtime.training.schedules import Schedule
from pp_runtime.training.step_timer import PhaseTimer

PEAK_FLOPS_H200_BF16 = 787e12  # measured bf16 matmul 8192^3 on H200 (benchmarks/bench_infer.py, device_ceilings)


@dataclass
class TrainConfig:
    """The optimisation settings (the `train` group of launch/finetune.py's config extends this class)."""

    steps: int = 200  # total optimizer steps (a resumed run continues up to this number)
    batch_size: int = 16  # rows per step over all replicas; divides into replicas x micro-batches
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # end of the cosine decay
    warmup_steps: int = 10  # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip by the global norm across all stages; 0 = off
    skip_nonfinite: bool = False  # skip a step whose loss or gradient norm is not finite, instead of stopping
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    master_weights: Any = "auto"  # float32 master weights for the optimizer: auto (None) = when the model
    #                               dtype is bfloat16/float16; true; false
    zero: int = 0  # 1: ZeRO-1, optimizer state and master weights sharded over the data-parallel replicas
    optimizer: str = "adamw"  # adamw (on the device) | cpu_adam (host memory, DeepSpeed's CPU Adam)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"train.{name}={value!r} must be an integer")
        for name in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            setattr(self, name, _finite(getattr(self, name), f"train.{name}"))
        if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__len__") or len(self.betas) != 2:
            raise ConfigError(f"train.betas={self.betas!r} must be a pair, e.g. train.betas=[0.9,0.95]")
        self.betas = (_finite(self.betas[0], "train.betas"), _finite(self.betas[1], "train.betas"))
        if self.steps < 0:
            raise ConfigError(f"train.steps={self.steps} must be >= 0")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0 and train.min_lr={self.min_lr} >= 0")
        if self.master_weights in (None, "auto"):
            self.master_weights = None
        elif not isinstance(self.master_weights, bool):
            raise ConfigError(f"train.master_weights={self.master_weights!r} must be auto, true or false")
        if isinstance(self.zero, bool) or self.zero not in (0, 1):
            raise ConfigError(f"train.zero={self.zero!r} must be 0 (off) or 1 (ZeRO-1: optimizer state sharded "
                              "over the replicas)")
        if self.optimizer not in ("adamw", "cpu_adam"):
            raise ConfigError(f"train.optimizer={self.optimizer!r} must be adamw (on the device) or cpu_adam "
                              "(DeepSpeed's CPU Adam, state in host memory)")


def _finite(value: Any, name: str) -> float:
    """A finite number, or a one-line ConfigError (`train.lr=nan` would train on NaN)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    return x


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (>= 2-D), none on norm weights."""
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies over the valid targets (float32 or better)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """6 x non-embedding (active) parameters + 6 x layers x heads x head_dim x seq (attention's QK^T and AV, causal)."""
    d, hd = args.dim, args.head_dim
    attn = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * d * args.hidden_dim * (args.moe.num_experts_per_tok if args.moe else 1)
    gate = d * args.moe.num_experts if args.moe else 0
    n = args.n_layers * (attn + ffn + gate + 2 * d) + d + d * args.vocab_size  # blocks, final norm, head
    return 6.0 * n + 6.0 * args.n_layers * args.n_heads * hd * seq_len


@dataclass
class StepStats:
    step: int  # 1-based number of the step just taken
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # tokens processed in the step (all replicas, padding included)
    valid_tokens: int  # targets the loss was taken over
    step_time_s: float
    tokens_per_s: float
    mfu: Optional[float]
    epoch: float
    skipped_nonfinite: int = 0  # steps skipped so far for a non-finite loss or gradient norm (this run)
    timings: list = field(default_factory=list, repr=False)  # this rank's (Action, start, end)
    expert_load: Optional[ExpertLoad] = None  # MoE: tokens per expert per layer in the step
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the step (rank 0's)

    def to_json(self) -> dict:
        return {
            "step": self.step, "loss": _json_number(self.loss), "lr": self.lr, "grad_norm": _json_number(self.grad_norm),
            "tokens": self.tokens, "valid_tokens": self.valid_tokens, "step_time_s": round(self.step_time_s, 6),
            **{f"{phase}_s": round(t, 6) for phase, t in self.phases.items()},
            "tokens_per_s": round(self.tokens_per_s, 2), "mfu": None if self.mfu is None else round(self.mfu, 5),
            "epoch": round(self.epoch, 5), "skipped_nonfinite": self.skipped_nonfinite, "time": time.time(),
            **({"expert_tokens": self.expert_load.to_json()} if self.expert_load is not None else {}),
        }

    def line(self, total_steps: int) -> str:
        mfu = f" | MFU {100 * self.mfu:.1f}%" if self.mfu is not None else ""
        experts = f" | {self.expert_load.line()}" if self.expert_load is not None else ""
        mfu += f" | {self.skipped_nonfinite} non-finite step(s) skipped" if self.skipped_nonfinite else ""
        schedule = self.phases.get("schedule", 0.0)
        optimizer = self.phases.get("optimizer", 0.0)
        split = (f" (schedule {schedule:.3f}s, optimizer {optimizer:.3f}s, other {self.step_time_s - schedule - optimizer:.3f}s)"
                 if self.phases else "")
        return (f"step {self.step}/{total_steps} | loss {self.loss:.4f} | lr {self.lr:.3e} | grad_norm {self.grad_norm:.4f} | "
                f"{self.tokens_per_s:,.0f} tok/s{mfu} | {self.step_time_s:.3f}s{split}{experts}")


def _json_number(x: float) -> Optional[float]:
    """JSON has no NaN: a skipped non-finite step's loss is written as null."""
    return x if math.isfinite(x) else None


class Trainer:
    """Holds this rank's stages, the optimizer and the data position; `step()` takes one optimizer step."""

    def __init__(
        self,
        ctx: ParallelContext,
        args: ModelArgs,
        schedule: Schedule,
        stages: Mapping[int, StageModule],
        data: PackedDataset,
        cfg: TrainConfig,
        metrics_path: Optional[Path] = None,
        console: bool = True,
        log_every: int = 1,
        peak_flops: float = PEAK_FLOPS_H200_BF16,
    ) -> None:
        self.ctx, self.args, self.schedule, self.cfg, self.data = ctx, args, schedule, cfg, data
        self.log_every, self.peak_flops = max(1, log_every), peak_flops  # console lines; MFU's denominator
        self.stages = dict(sorted(stages.items()))
        self.rows_per_mb = check_batch_shape(cfg.batch_size, ctx.dp_size, schedule.n_microbatches)
        self.rows_per_replica = cfg.batch_size // ctx.dp_size
        self.step_count = 0  # optimizer steps taken
        self.position = 0  # rows of the data stream consumed
        self.skipped_nonfinite = 0
        self.metrics_path = metrics_path if ctx.rank == 0 else None
        self.console = console and ctx.rank == 0
        for m in self.stages.values():
            m.train()
            m.activation_checkpointing = cfg.activation_checkpointing
        # what the optimizer trains: every parameter, or with LoRA (frozen base weights) only the adapters
        self.named_params: list[tuple[str, torch.nn.Parameter]] = [
            (name, p) for m in self.stages.values() for name, p in m.named_parameters() if p.requires_grad
        ]
        if not self.named_params:
            raise ConfigError(f"pipeline rank {ctx.pp_rank} has nothing to train (its stages hold no trainable "
                              "parameter, e.g. no LoRA target); use fewer stages or another pipeline.split")
        names = [n for n, _ in self.named_params]
        if len(set(names)) != len(names):
            raise ValueError("local stages share parameter names; stages must hold disjoint layers")
        dtype = self.named_params[0][1].dtype
        self.master = cfg.master_weights if cfg.master_weights is not None else dtype in (torch.bfloat16, torch.float16)
        self.flat = None  # the flat step (ZeRO-1 / CPU offload), else the plain per-tensor AdamW below
        if cfg.zero or cfg.optimizer != "adamw":
            from pp_runtime.training.optim_sharding import FlatAdamW

            self.flat = FlatAdamW(ctx, self.named_params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, zero=bool(cfg.zero), offload=cfg.optimizer == "cpu_adam",
                                  master=self.master)
            self.opt_params = self.named_params
            self.fused = self.flat.fused
            self.optimizer = self.flat.optimizer
        else:
            if self.master:
                self.opt_params = [(n, torch.nn.Parameter(p.detach().float().clone())) for n, p in self.named_params]
            else:
                self.opt_params = self.named_params
            self.fused = ctx.device.type == "cuda"  # one kernel for the whole update instead of several per tensor
            self.optimizer = torch.optim.AdamW(param_groups(self.opt_params, cfg.weight_decay), lr=cfg.lr,
                                               betas=tuple(cfg.betas), eps=cfg.eps, fused=self.fused or None)
        self.timer = PhaseTimer(ctx.device)
        links = EdgeLinks(ctx.rank, edge_groups(ctx, pipeline_edges(schedule))) if ctx.pp_size > 1 else None
        self.executor = PipelineExecutor(schedule, ctx.pp_rank, self.stages, ctx.pp_ranks, links, ctx.device)
        self.flops_per_token = flops_per_token(args, data.seq_len)

    # ------------------------------------------------------------------------------ batches
    def step_batch(self, step_position: int) -> Batch:
        """All rows of the step starting at `step_position` (every replica's)."""
        return self.data.batch(step_position, self.cfg.batch_size)

    def microbatches(self, batch: Batch) -> list[MicroBatch]:
        """This replica's rows of the step, as micro-batches with their attention metadata."""
        lo = self.ctx.dp_rank * self.rows_per_replica
        mine = Batch(batch.tokens[lo:lo + self.rows_per_replica], batch.targets[lo:lo + self.rows_per_replica],
                     batch.doc_lens[lo:lo + self.rows_per_replica])
        a = self.args
        out = []
        for part in mine.split(self.schedule.n_microbatches):
            meta = build_training_meta(part.doc_lens, window=a.sliding_window, head_dim=a.head_dim,
                                       rope_theta=a.rope_theta, n_kv_groups=a.n_heads // a.n_kv_heads,
                                       device=self.ctx.device)
            out.append(MicroBatch(part.tokens.reshape(-1).to(self.ctx.device),
                                  part.targets.reshape(-1).to(self.ctx.device), meta))
        return out

    # ------------------------------------------------------------------------------ the step
    def step(self) -> StepStats:
        ctx, cfg = self.ctx, self.cfg
        timer = self.timer
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t0 = time.perf_counter()
        timer.start()
        batch = self.step_batch(self.position)
        n_valid = batch.n_valid  # over the whole step: every replica, every micro-batch
        scale = 1.0 / max(n_valid, 1)

        def loss_fn(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
            ce = token_loss(logits, mb.targets)
            return ce * scale, ce.detach()

        for _, p in self.named_params:
            p.grad = None
        microbatches = self.microbatches(batch)
        timer.mark("data")
        record = self.executor.run(microbatches, loss_fn)
        timer.mark("schedule")
        if self.flat is not None:
            self.flat.reduce_gradients(self._grads())
            for _, p in self.named_params:
                p.grad = None  # the flat buffer (or this replica's slice of it) holds them now
        else:
            self._reduce_gradients()
        timer.mark("grad_reduce")
        grad_norm = self.flat.global_norm(cfg.grad_clip) if self.flat is not None else self._clip()
        timer.mark("clip")
        loss_sum = record.loss_sum.clone()
        if ctx.distributed:
            dist.all_reduce(loss_sum)  # only last-stage ranks contribute; the sum is over replicas
        expert_load = self._expert_load()
        loss = float(loss_sum) / max(n_valid, 1)  # the finiteness check needs it before the update
        timer.mark("loss")
        lr = lr_at(self.step_count, cfg)
        if math.isfinite(loss) and math.isfinite(grad_norm) and self.flat is not None:
            self.flat.step(lr)
        elif math.isfinite(loss) and math.isfinite(grad_norm):  # both are the same on every rank
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            if self.master:
                with torch.no_grad():
                    torch._foreach_copy_([p for _, p in self.named_params], [mp for _, mp in self.opt_params])
        elif cfg.skip_nonfinite:
            self.skipped_nonfinite += 1
            if self.flat is not None:
                self.flat.skip()
        else:
            raise TrainingError(
                f"step {self.step_count + 1}: the loss is {loss} and the gradient norm {grad_norm}; training stopped "
                "without applying or saving this step (the last checkpoint is intact). Lower train.lr, check the "
                "data, or set train.skip_nonfinite=true to skip such steps"
            )
        timer.mark("optimizer")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        dt = time.perf_counter() - t0
        self.step_count += 1
        self.position += cfg.batch_size
        tokens = int(batch.tokens.numel())
        tps = tokens / max(dt, 1e-12)
        mfu = tps * self.flops_per_token / (ctx.world_size * self.peak_flops) if ctx.device.type == "cuda" else None
        stats = StepStats(step=self.step_count, loss=loss, lr=lr, grad_norm=grad_norm,
                          tokens=tokens, valid_tokens=n_valid, step_time_s=dt, tokens_per_s=tps, mfu=mfu,
                          epoch=self.data.epoch_of(self.position), skipped_nonfinite=self.skipped_nonfinite,
                          timings=record.timings, expert_load=expert_load, phases=timer.durations())
        self._log(stats)
        return stats

    def _expert_load(self) -> Optional[ExpertLoad]:
        """Tokens each expert took in this step (padding of packed rows included: experts compute it
        too), over every MoE layer and replica; counters restart for the next step."""
        if not self.args.is_moe:
            return None
        counts = torch.zeros(self.args.moe.num_experts, dtype=torch.int64, device=self.ctx.device)
        for m in self.stages.values():
            local = expert_token_counts(m, reset=True)
            if local is not None:
                counts += local
        if self.ctx.distributed:
            dist.all_reduce(counts)  # stages hold disjoint layers; replicas disjoint tokens
        return ExpertLoad.from_counts(counts, self.args.n_layers)

    def _grads(self) -> list[torch.Tensor]:
        """Model gradients, zeros where a parameter got none (an unrouted expert), so reductions line up."""
        out = []
        for _, p in self.named_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    def _reduce_gradients(self, bucket_elems: int = 1 << 25) -> None:
        """Sum gradients across data-parallel replicas, in flat buckets of about `bucket_elems`."""
        grads = self._grads()
        if self.ctx.dp_size > 1:
            buckets: list[list[torch.Tensor]] = [[]]
            size = 0
            for g in grads:
                if buckets[-1] and size + g.numel() > bucket_elems:
                    buckets.append([])
                    size = 0
                buckets[-1].append(g)
                size += g.numel()
            for bucket in buckets:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=self.ctx.dp_group)
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
        if self.master:
            for (_, p), (_, mp) in zip(self.named_params, self.opt_params):
                mp.grad = p.grad.detach().float()

    def _clip(self) -> float:
        """Global norm over all stages (and DP-consistent); clips in place when above grad_clip."""
        grads = [mp.grad for _, mp in self.opt_params]
        sq = torch.stack(torch._foreach_norm(grads)).to(torch.float64).pow(2).sum()
        if self.ctx.pp_size > 1:
            dist.all_reduce(sq, group=self.ctx.pp_group)
        norm = float(sq.sqrt())
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            torch._foreach_mul_(grads, self.cfg.grad_clip / (norm + 1e-6))
        return norm

    def _log(self, stats: StepStats) -> None:
        if self.console and (stats.step % self.log_every == 0 or stats.step == self.cfg.steps):
            print(stats.line(self.cfg.steps), flush=True)
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats.to_json(), allow_nan=False) + "\n")

    # ------------------------------------------------------------------------------ state
    def weights_of_record(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the optimizer's (master) copy of every local parameter, by global name.

        With the flat step (ZeRO-1 / cpu_adam) the slices are gathered on data-parallel rank 0 (host
        memory; the other replicas get {}): collective over the replicas, call it on every rank."""
        if self.flat is not None:
            return self.flat.full_weights()
        return {n: p.detach() for n, p in self.opt_params}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW state by global parameter name: NAME.exp_avg, NAME.exp_avg_sq, NAME.step (flat step:
        collective, like weights_of_record)."""
        if self.flat is not None:
            return self.flat.full_optimizer_state()
        out: dict[str, torch.Tensor] = {}
        for n, p in self.opt_params:
            st = self.optimizer.state.get(p)
            if not st:
                continue
            out[f"{n}.exp_avg"] = st["exp_avg"].detach()
            out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach()
            out[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        return out

    def load_state(self, weights: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor], step: int, position: int) -> None:
        """Adopt a checkpoint's weights and optimizer state (any split: looked up by global name)."""
        if self.flat is not None:
            self.flat.load(weights, optim)
            self.step_count, self.position = int(step), int(position)
            return
        with torch.no_grad():
            for (n, p), (_, mp) in zip(self.named_params, self.opt_params):
                mp.copy_(weights[n])
                if mp is not p:
                    p.copy_(mp)
        for n, p in self.opt_params:
            if f"{n}.exp_avg" in optim:
                step_t = optim[f"{n}.step"].reshape(()).clone().float()
                self.optimizer.state[p] = {
                    "step": step_t.to(p.device) if self.fused else step_t.cpu(),  # where AdamW keeps it
                    "exp_avg": optim[f"{n}.exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                    "exp_avg_sq": optim[f"{n}.exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
                }
        self.step_count, self.position = int(step), int(position)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps 1..`step` (a resumed run continues from there; the lines a crashed
    run wrote after its last checkpoint would otherwise appear twice)."""
    if not path.is_file():
        path.write_text("")
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            rec_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut off by the crash
        if isinstance(rec_step, int) and rec_step <= step and line.endswith("\n"):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
