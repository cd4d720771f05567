"""`launch/finetune.py` with each rank printing its CUDA memory after every step and after set-up."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pp_runtime.jobs.cli import hydra_main  # noqa: E402
from pp_runtime.training import trainer as tr  # noqa: E402

_step = tr.Trainer.step


def _gib(x):
    return round(x / 2**30, 2)


def step(self):
    if self.step_count == 0:
        print(f"MEM rank {self.ctx.rank} before step 1: alloc {_gib(torch.cuda.memory_allocated())} "
              f"peak {_gib(torch.cuda.max_memory_allocated())} reserved {_gib(torch.cuda.memory_reserved())}", flush=True)
    out = _step(self)
    print(f"MEM rank {self.ctx.rank} step {self.step_count}: alloc {_gib(torch.cuda.memory_allocated())} "
          f"peak {_gib(torch.cuda.max_memory_allocated())} reserved {_gib(torch.cuda.memory_reserved())}", flush=True)
    return out


tr.Trainer.step = step


def main(cfg):
    from pp_runtime.jobs.finetune import run

    return run(cfg)


if __name__ == "__main__":
    hydra_main("finetune", main, sweeps=True)
