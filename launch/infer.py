"""Pipelined generation: `torchrun --nproc_per_node=N launch/infer.py [key=value ...]` (see conf/infer.yaml)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.cli import run_main  # noqa: E402
from pp_runtime.config import load_config  # noqa: E402


def main(argv: list[str]) -> int:
    from pp_runtime.infer_job import run

    return run(load_config("infer", argv))


if __name__ == "__main__":
    run_main(main)
