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

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train_common import accepts, build_stage
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.transformer import StageModule
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

    def step(i: int) -> tuple[float, Any]:
        for _, p in trainer.named_params:
            p.grad = None
        losses: list = []
        args = (tokens,) if first else ()
        target_kw = {"target": targets, "losses": losses} if last else {}
        sched.step(*args, **target_kw, **step_kw)
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
        return float(loss_sum), None

    state["step"] = step


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
