"""Pipelined training: `torchrun --nproc_per_node=N launch/finetune.py data.path=FILE.jsonl [overrides]`
(see conf/finetune.yaml)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.cli import run_main  # noqa: E402
from pp_runtime.config import load_config  # noqa: E402


def main(argv: list[str]) -> int:
    from pp_runtime.finetune_job import run

    return run(load_config("finetune", argv))


if __name__ == "__main__":
    run_main(main)
