"""Pipelined training: `torchrun --nproc_per_node=N launch/finetune.py [key=value ...]` (no arguments:
a short fine-tune of the embedded demo model); `--help` lists the settings, `--multirun` sweeps
(pp_runtime/jobs/settings.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.jobs.cli import hydra_main  # noqa: E402


def main(cfg) -> int:
    from pp_runtime.jobs.finetune import run

    return run(cfg)


if __name__ == "__main__":
    # expandable segments: the flat optimizer buffers (ZeRO-1, cpu_adam) no longer strand freed activation
    # blocks; on 2 H200s a 7B ZeRO-1 step reserved 91 GiB instead of 123 GiB, at the same speed
    hydra_main("finetune", main, sweeps=True, cuda_alloc_conf="expandable_segments:True")
