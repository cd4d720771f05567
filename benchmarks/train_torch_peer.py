"""torch.distributed.pipelining as a peer of `bench_train.py`: the same StageModule blocks, weights,
batch, loss and gradient path, under torch's own schedules (Schedule1F1B, ScheduleGPipe,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV).

A multi-stage schedule gets this rank's stages in the placement torch uses for it (looped for the
interleaved ones, the V for ZBV and DualPipeV), which is the placement of our schedule of the same
shape, so both sides train the same split. The loss is the token-summed cross-entropy divided by
the valid tokens of the step (`scale_grads=False`); after `step` the gradient path is the
Trainer's own (global-norm clipping across stages, fused AdamW, the same master-weight setting).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train_common import accepts, build_stage, sync
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.transformer import StageModule
from pp_runtime.training.schedules import BACKWARD, FORWARD, Action
from pp_runtime.training.trainer import Trainer, lr_at, token_loss


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


def schedule_class(name: str):
    """torch's schedule class `name`, or None when this torch has none of that name."""
    import torch.distributed.pipelining as pipelining

    return getattr(pipelining, name, None)


def build_torch(bench, config, state: dict) -> None:
    """Build `config` (a torch-* configuration) on this rank; puts its step function in `state`."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    cls = schedule_class(config.peer_class)
    if cls is None:
        raise RuntimeError(f"torch {torch.__version__} has no {config.peer_class}")
    ctx, a, m = bench.ctx, bench.a, bench.margs
    schedule, plan = bench.schedule_of(config), bench.plan_of(config)
    specs = plan.for_rank(ctx.pp_rank)
    modules = {spec.index: build_stage(m, spec, bench.dtype, ctx.device, a.seed) for spec in specs}
    # The Trainer is used only for its gradient path (clip, master weights, AdamW); its executor stays idle.
    trainer = Trainer(ctx, m, schedule, modules, bench.data, bench.train_config(), metrics_path=None, console=False)
    meta = build_training_meta([[a.seq]], window=m.sliding_window, head_dim=m.head_dim, rope_theta=m.rope_theta,
                               n_kv_groups=m.n_heads // m.n_kv_heads, device=ctx.device)
    pstages, static = [], True
    for spec in specs:
        module = TorchPipeModule(modules[spec.index], meta)
        example_in, example_out = _example_shapes(bench, spec)
        try:
            pstage = PipelineStage(module, spec.index, len(plan.stages), ctx.device, input_args=(example_in,),
                                   output_args=(example_out,), group=ctx.pp_group)
        except Exception:  # noqa: BLE001 - a torch that wants no example shapes infers them in the first step
            pstage = PipelineStage(module, spec.index, len(plan.stages), ctx.device, group=ctx.pp_group)
            static = False
        pstages.append(pstage)
    batch = bench.data.batch(0, a.microbatches)
    scale = 1.0 / max(batch.n_valid, 1)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, targets) * scale

    kw: dict[str, Any] = {"loss_fn": loss_fn}
    if accepts(cls.__init__, "scale_grads"):
        kw["scale_grads"] = False  # the loss is already divided by the step's valid tokens
    single = issubclass(cls, PipelineScheduleSingle)
    if single and len(pstages) != 1:
        raise RuntimeError(f"{config.peer_class} runs one stage per rank, got {len(pstages)}")
    sched = cls(pstages[0] if single else pstages, a.microbatches, **kw)
    step_kw = {"return_outputs": False} if accepts(sched.step, "return_outputs") else {}
    state["options"] = {"scale_grads": kw.get("scale_grads"), "return_outputs": step_kw.get("return_outputs"),
                        "static_shapes": static}
    tokens = batch.tokens.reshape(-1).to(ctx.device)  # [m * seq]: split into m micro-batches of one row
    targets = batch.targets.reshape(-1).to(ctx.device)
    first, last = any(s.has_embedding for s in specs), any(s.has_head for s in specs)
    state.update(trainer=trainer, stages=pstages, sched=sched)
    recorder = ActionRecorder(pstages, sched, cuda=ctx.device.type == "cuda")

    def step(i: int) -> tuple[float, Any]:
        sync(ctx)
        t0 = time.perf_counter()
        recorder.start()
        for _, p in trainer.named_params:
            p.grad = None
        losses: list = []
        args = (tokens,) if first else ()
        target_kw = {"target": targets, "losses": losses} if last else {}
        sched.step(*args, **target_kw, **step_kw)
        recorder.mark_schedule_end()
        # From here on, exactly the Trainer's step after its executor ran.
        trainer._reduce_gradients()
        trainer._clip()
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr_at(i, trainer.cfg)
        trainer.optimizer.step()
        if trainer.master:
            with torch.no_grad():
                torch._foreach_copy_([p for _, p in trainer.named_params], [mp for _, mp in trainer.opt_params])
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for x in losses:
            loss_sum += x.detach().to(torch.float64)
        if ctx.distributed:
            dist.all_reduce(loss_sum)
        loss = float(loss_sum)
        sync(ctx)
        dt = time.perf_counter() - t0
        timings, schedule_s = recorder.read(t0)
        bench._last_timings = timings
        # a schedule that runs its chunks some other way (no per-chunk calls seen) reports no timings
        return loss, ((timings, dt, {"schedule": schedule_s}) if timings else None)

    state["step"] = step


class ActionRecorder:
    """CUDA events around torch's per-micro-batch forward (with the loss on the last stage) and
    backward of each stage, read once per step: the same (Action, start, end) rows as our executor
    records, so the bench reports torch's bubble and action times the same way. Each start event
    is recorded after the schedule has made the stream wait for the action's input. On CPU, host
    clocks (the work is synchronous there)."""

    def __init__(self, pstages: list, sched, cuda: bool) -> None:
        self.cuda = cuda
        self.rows: list[list] = []
        for stage in pstages:
            stage.forward_one_chunk = self._wrap(stage.forward_one_chunk, FORWARD, stage.stage_index)
            stage.backward_one_chunk = self._wrap(stage.backward_one_chunk, BACKWARD, stage.stage_index)
        if hasattr(sched, "_maybe_compute_loss"):
            inner = sched._maybe_compute_loss

            def with_loss(stage, *args, **kwargs):
                out = inner(stage, *args, **kwargs)
                if stage.is_last and self.rows and self.rows[-1][0].kind == FORWARD:
                    self.rows[-1][2] = self._event()  # the loss belongs to the forward, as in ours
                return out

            sched._maybe_compute_loss = with_loss

    def _event(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _wrap(self, fn, kind: str, stage_index: int):
        def wrapped(chunk_id, *args, **kwargs):
            start = self._event()
            out = fn(chunk_id, *args, **kwargs)
            self.rows.append([Action(kind, int(chunk_id), stage_index), start, self._event()])
            return out

        return wrapped

    def start(self) -> None:
        self.rows = []
        self.base = self._event()

    def mark_schedule_end(self) -> None:
        self.end = self._event()

    def read(self, t0: float) -> tuple[list, float]:
        """(Action, start, end) in host seconds from t0 (the device synchronized), and the schedule's time."""
        if not self.cuda:
            return [(a, s, e) for a, s, e in self.rows], self.end - self.base
        base = self.base
        rows = [(a, t0 + base.elapsed_time(s) / 1e3, t0 + base.elapsed_time(e) / 1e3) for a, s, e in self.rows]
        return rows, base.elapsed_time(self.end) / 1e3


def _example_shapes(bench, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's input and output of `spec`, as meta tensors (nothing allocated); the
    activations carry requires_grad so that gradients flow back to the previous stage."""
    m, seq, meta = bench.margs, bench.a.seq, torch.device("meta")
    if spec.has_embedding:
        example_in = torch.empty(seq, dtype=torch.long, device=meta)
    else:
        example_in = torch.empty(seq, m.dim, dtype=bench.dtype, device=meta, requires_grad=True)
    if spec.has_head:
        example_out = torch.empty(seq, m.vocab_size, dtype=torch.float32, device=meta, requires_grad=True)
    else:
        example_out = torch.empty(seq, m.dim, dtype=bench.dtype, device=meta, requires_grad=True)
    return example_in, example_out
