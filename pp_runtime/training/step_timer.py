"""Durations of the phases of a training step, with no host synchronisation per phase.

On GPU each boundary is a CUDA event on the compute stream, read after the step's final
synchronisation, so a phase's time is what the GPU spent between its boundaries (a host-side
clock would only measure how long launching took). On CPU it is the host clock.
"""

from __future__ import annotations

import time
from typing import Union

import torch

Mark = Union[float, "torch.cuda.Event"]


class PhaseTimer:
    """`start()`, then `mark(name)` at the end of each phase; `durations()` once the device is idle."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, Mark]] = []

    def _now(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def durations(self) -> dict[str, float]:
        """Seconds per phase, in the order marked (a phase marked twice adds up)."""
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[phase] = out.get(phase, 0.0) + seconds
        return out
