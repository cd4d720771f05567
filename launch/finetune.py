"""Pipelined training: `torchrun --nproc_per_node=N launch/finetune.py [key=value ...]` (no arguments:
a short fine-tune of the embedded demo model); `--help` lists the settings, `--multirun` sweeps
(conf/finetune.yaml)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.jobs.cli import hydra_main  # noqa: E402


def main(cfg) -> int:
    from pp_runtime.jobs.finetune import run

    return run(cfg)


if __name__ == "__main__":
    hydra_main("finetune", main, sweeps=True)
