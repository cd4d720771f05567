"""Pipelined generation: `torchrun --nproc_per_node=N launch/infer.py [key=value ...]`; `--help` lists the
settings (pp_runtime/jobs/settings.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.jobs.cli import hydra_main  # noqa: E402


def main(cfg) -> int:
    from pp_runtime.jobs.infer import run

    return run(cfg)


if __name__ == "__main__":
    hydra_main("infer", main)
