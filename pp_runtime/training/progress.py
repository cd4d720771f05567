"""What rank 0 shows while training: a progress bar on a terminal (step, loss, tokens/s, ETA), plain
lines every few steps otherwise (logs, SLURM output), where a redrawn bar would be noise."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO

from pp_runtime.training.trainer import StepStats


def format_duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class TrainProgress:
    """A tqdm bar on stderr when it is a terminal; else a line on stdout every `log_every` steps
    (and at the first and last step), each ending with the ETA."""

    def __init__(self, total_steps: int, start_step: int, log_every: int, stream: Optional[TextIO] = None) -> None:
        self.total, self.start = total_steps, start_step
        self.log_every = max(1, log_every)
        self.t0 = time.perf_counter()
        self.last: Optional[StepStats] = None
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            # the size from shutil (COLUMNS/LINES, else the terminal): tqdm's own probe can read a 0 x 0
            # terminal and then draws nothing
            cols, rows = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=stream,
                            ncols=max(cols, 60), nrows=max(rows, 5))

    def eta_s(self, step: int) -> float:
        done = step - self.start
        return (self.total - step) * (time.perf_counter() - self.t0) / done if done > 0 else float("inf")

    def line(self, stats: StepStats) -> str:
        eta = self.eta_s(stats.step)
        return f"{stats.line(self.total)} | ETA {format_duration(eta) if eta != float('inf') else '?'}"

    def update(self, stats: StepStats) -> None:
        self.last = stats
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {stats.loss:.4f}, {stats.tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)
        elif stats.step % self.log_every == 0 or stats.step in (self.start + 1, self.total):
            print(self.line(stats), flush=True)

    def close(self) -> None:
        """Close the bar and leave the last step's line in the output."""
        if self.bar is not None:
            self.bar.close()
            if self.last is not None:
                print(self.last.line(self.total), flush=True)
