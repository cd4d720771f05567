"""Resumable batch inference over a JSONL file:
`torchrun --nproc_per_node=N launch/batch_infer.py input=prompts.jsonl output=results.jsonl [key=value ...]`
(see conf/batch_infer.yaml and docs/slurm.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.cli import run_main  # noqa: E402
from pp_runtime.config import load_config  # noqa: E402


def main(argv: list[str]) -> int:
    from pp_runtime.batch_job import run

    return run(load_config("batch_infer", argv))


if __name__ == "__main__":
    run_main(main)
