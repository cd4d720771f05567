"""DeepSpeed's pipeline engine as a peer of `bench_train.py` (optional: skipped with a note when
deepspeed cannot be imported; `pip install deepspeed`, the project's `deepspeed` extra).

`deepspeed.pipe.PipelineModule` gets one layer per pipeline stage: a LayerSpec that builds, on
its own rank only, the same seeded StageModule our runtime trains (same split, same weights).
The engine runs its 1F1B TrainSchedule over `--microbatches` micro-batches of one row, then its
own gradient clipping (global norm across stages) and the step of a client fused AdamW with our
parameter groups. Its loss per micro-batch is the token-summed cross-entropy divided by the
step's valid tokens, times the number of micro-batches (the engine divides by its gradient
accumulation steps), so the gradients equal ours. With `--master-weights` the engine's bf16 mode
keeps float32 master weights (as ours does); without, AdamW updates the bf16 parameters directly.
"""

from __future__ import annotations

import importlib.util
from itertools import cycle
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from train_common import build_stage
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.training.trainer import lr_at, param_groups, token_loss


def unavailable() -> Optional[str]:
    """Why this peer cannot run here, or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed, the project's 'deepspeed' extra)"
    return None


class DeepSpeedStage(nn.Module):
    """One pipeline stage for PipelineModule: built only on the rank that holds it."""

    def __init__(self, bench, spec) -> None:
        super().__init__()
        m, a, dev = bench.margs, bench.a, bench.ctx.device
        self.stage = build_stage(m, spec, bench.dtype, dev, a.seed)
        self.stage.activation_checkpointing = a.activation_checkpointing
        self.meta = build_training_meta([[a.seq]], window=m.sliding_window, head_dim=m.head_dim, rope_theta=m.rope_theta,
                                        n_kv_groups=m.n_heads // m.n_kv_heads, device=dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x, self.meta, logits="all")


def build_deepspeed(bench, config, state: dict) -> None:
    """Build the DeepSpeed engine on this rank; puts its step function in `state`."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    ctx, a = bench.ctx, bench.a
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group already running
    plan = bench.plan_of(config)
    batch = bench.data.batch(0, a.microbatches)
    scale = a.microbatches / max(batch.n_valid, 1)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, targets.reshape(-1)) * scale

    module = PipelineModule(layers=[LayerSpec(DeepSpeedStage, bench, spec) for spec in plan.stages],
                            num_stages=bench.pp, loss_fn=loss_fn, partition_method="uniform",
                            activation_checkpoint_interval=0)
    tcfg = bench.train_config()
    opt = torch.optim.AdamW(param_groups(list(module.named_parameters()), tcfg.weight_decay), lr=tcfg.lr,
                            betas=tuple(tcfg.betas), eps=tcfg.eps, fused=ctx.device.type == "cuda" or None)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": a.microbatches,
        "train_batch_size": a.microbatches,
        "gradient_clipping": tcfg.grad_clip,
        "bf16": {"enabled": bool(a.master_weights and bench.dtype == torch.bfloat16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
    rows = [(batch.tokens[i].to(ctx.device), batch.targets[i].to(ctx.device)) for i in range(a.microbatches)]
    data = cycle(rows)
    state.update(engine=engine, module=module)

    def step(i: int) -> tuple[float, Any]:
        for group in opt.param_groups:  # the engine steps these groups (a bf16 wrapper swaps in its float32 masters)
            group["lr"] = lr_at(i, tcfg)
        loss = engine.train_batch(data_iter=data)  # mean over micro-batches of loss_fn, on every rank
        return float(loss), None

    state["step"] = step
