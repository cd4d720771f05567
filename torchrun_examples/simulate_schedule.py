"""Schedules are data: build one, check it on paper, and draw its timeline.

    python torchrun_examples/simulate_schedule.py   # writes timeline_1f1b.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.training.schedules import build_schedule  # noqa: E402
from pp_runtime.training.simulator import simulate  # noqa: E402
from pp_runtime.training.timeline import draw_timeline  # noqa: E402

for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
    schedule = build_schedule(name, n_ranks=4, n_microbatches=8, virtual_stages=v)
    result = simulate(schedule)  # raises with the step it would hang at if the schedule deadlocks
    print(f"{name:12s} bubble {result.bubble_fraction:.3f}  peak activations per rank {result.peak_activations}")
    print("  rank 1 runs:", " ".join(str(a) for a in schedule.actions[1]))
draw_timeline(simulate(build_schedule("1f1b", 4, 8)), "timeline_1f1b.png", title="1F1B, 4 stages, 8 micro-batches")
print("wrote timeline_1f1b.png")
