"""Where a training run's metrics go besides the console and metrics.jsonl: TensorBoard event files
(`metrics.tensorboard=true`), Weights & Biases (`metrics.wandb=PROJECT`), and a loss curve
(`loss.png` beside metrics.jsonl) drawn at the end of every run.

Per step: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/mfu (GPU). Every
`log_every` steps, from all ranks: bubble/rank_R (the share of the step rank R spent outside its
forward, backward and weight-gradient work: pipeline bubble, communication, optimizer) and
memory/peak_gib/stage_S (peak allocated GPU memory; peak resident memory of the process on CPU).
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pp_runtime.distributed.parallel import ParallelContext
from pp_runtime.errors import ConfigError
from pp_runtime.training.trainer import StepStats


def check_loggers(metrics_cfg: Any) -> None:
    """Fail before training when a requested logger's package is missing (on every rank alike)."""
    if metrics_cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        except ImportError:
            raise ConfigError("metrics.tensorboard=true needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[test]'), or drop metrics.tensorboard") from None
    if metrics_cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"metrics.wandb={metrics_cfg.wandb} needs the wandb package, which is not installed: "
                              "pip install wandb (then wandb login), or drop metrics.wandb") from None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def bubble_fraction(stats: StepStats) -> float:
    busy = sum(end - start for _, start, end in stats.timings)
    return max(0.0, 1.0 - busy / stats.step_time_s) if stats.step_time_s > 0 else 0.0


class MetricSinks:
    """TensorBoard and W&B writers (rank 0), fed once per step by every rank."""

    def __init__(self, ctx: ParallelContext, metrics_cfg: Any, out_dir: Path, run_config: dict,
                 start_step: int) -> None:
        self.ctx = ctx
        self.log_every = max(1, metrics_cfg.log_every)
        self.per_rank = bool(metrics_cfg.tensorboard or metrics_cfg.wandb)
        self.writer = self.wandb_run = None
        if ctx.rank != 0:
            return
        if metrics_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run replaces what a killed run logged after its checkpoint
            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
        if metrics_cfg.wandb:
            import wandb

            self.wandb_run = wandb.init(project=str(metrics_cfg.wandb), name=out_dir.name, dir=str(out_dir),
                                        config=run_config, resume="allow")

    def record(self, stats: StepStats) -> None:
        """Every rank calls this after every step (the per-rank figures are gathered collectively)."""
        if not self.per_rank:
            return
        scalars = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
                   "train/tokens_per_s": stats.tokens_per_s}
        if stats.mfu is not None:
            scalars["train/mfu"] = stats.mfu
        if stats.step % self.log_every == 0:
            scalars.update(self._per_rank(stats))
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, stats.step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=stats.step)

    def _per_rank(self, stats: StepStats) -> dict[str, float]:
        mine = (self.ctx.pp_rank, bubble_fraction(stats), peak_memory_bytes(self.ctx.device))
        notes: list[Any] = [mine]
        if self.ctx.distributed:
            notes = [None] * self.ctx.world_size
            dist.all_gather_object(notes, mine)
        out = {f"bubble/rank_{r}": b for r, (_, b, _) in enumerate(notes)}
        peak: dict[int, int] = {}
        for stage, _, mem in notes:  # a stage's peak: the largest over its data-parallel replicas
            peak[stage] = max(peak.get(stage, 0), mem)
        out.update({f"memory/peak_gib/stage_{s}": m / 2**30 for s, m in sorted(peak.items())})
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def draw_loss_curve(metrics_path: Path, out: Path) -> Optional[Path]:
    """loss.png from metrics.jsonl (every step of the run, resumed parts included)."""
    steps, losses = [], []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps.append(rec["step"])
                losses.append(rec["loss"])
    if not steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per valid token)")
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"training loss, {metrics_path.parent.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out
