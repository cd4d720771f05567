"""A fine-tuning run's output folder when `out_dir` is not given.

A new dated folder per run (`outputs/finetune/DATE_TIME`; in a `--multirun` sweep the job folder
Hydra makes, `outputs/finetune/multirun_DATE_TIME/JOB`), so two runs never mix their metrics,
checkpoints or exports; with `checkpoint.dir` given (SLURM requeues) the run keeps that one
folder, so a resumed job continues its own metrics. Rank 0 chooses and the others adopt its
choice: ranks started a second apart would otherwise name different folders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist

from pp_runtime.distributed.parallel import ParallelContext
from pp_runtime.errors import ConfigError
from pp_runtime.jobs.config import resolve_path

if TYPE_CHECKING:
    from pp_runtime.jobs.settings import FinetuneSettings

ROOT = Path("outputs") / "finetune"


def _sweep_job_dir() -> Optional[Path]:
    """This job's folder in a Hydra --multirun sweep (hydra.sweep.dir/JOB), or None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir).resolve() if hc.mode == RunMode.MULTIRUN else None


def _new_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if taken; created, so a run started in the same second cannot take it."""
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free folder name next to {path}")


def default_out_dir(cfg: FinetuneSettings) -> Path:
    if cfg.checkpoint.dir:
        return resolve_path(cfg.checkpoint.dir)
    job_dir = _sweep_job_dir()
    if job_dir is not None:
        return job_dir
    return _new_folder((ROOT / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve())


def choose_out_dir(cfg: FinetuneSettings, ctx: ParallelContext) -> Path:
    """`out_dir` as given, else rank 0's `default_out_dir`, the same on every rank."""
    given = resolve_path(cfg.out_dir)
    if given is not None:
        return given
    chosen: list[Any] = [None]
    if ctx.rank == 0:
        try:
            chosen = [default_out_dir(cfg)]
        except OSError as e:  # shared with the other ranks, which would otherwise wait for a folder
            chosen = [f"cannot create an output folder ({e}); set out_dir=DIR to a writable folder"]
    if ctx.distributed:
        dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], str):
        raise ConfigError(chosen[0])
    return chosen[0]


def export_dir(cfg: FinetuneSettings, out_dir: Path) -> Optional[Path]:
    """`export`: auto = OUT_DIR/export, null = no export, else the folder given."""
    export = cfg.export
    if export == "auto":
        return out_dir / "export"
    return resolve_path(export)
