"""Timeline picture of a pipeline schedule: one row per rank, one box per action.

Takes simulated timings (`SimResult.timings`) or timings measured in a real run, both as a
per-rank list of (Action, start, end). CLI::

    python -m pp_runtime.training.timeline --schedule 1f1b --ranks 4 --microbatches 8 --out timeline.png
    python -m pp_runtime.training.timeline --schedule interleaved --ranks 4 --microbatches 8 --virtual 2
    python -m pp_runtime.training.timeline --schedule zb-v --ranks 4 --microbatches 8
    python -m pp_runtime.training.timeline --file my_schedule.json --out mine.png

It prints the bubble fraction and peak activations and exits non-zero on an invalid schedule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from pp_runtime.errors import ConfigError, PPRuntimeError
from pp_runtime.training.schedules import SCHEDULE_NAMES, Action, Schedule, build_schedule, canonical_name, load_schedule
from pp_runtime.training.simulator import SimResult, Timed, Timings, simulate

# (base colour, text colour) per action kind; later virtual chunks are drawn lighter
_COLOURS = {"F": ("#1f77b4", "white"), "B": ("#d62728", "white"), "W": ("#2ca02c", "white")}
_KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight grad"}
_MIN_LABEL_PT = 7.0


def _as_rows(timings: Union[Timings, SimResult]) -> list[list[Timed]]:
    """Per-rank rows with times shifted so the earliest start is 0 (measured clocks are absolute)."""
    rows_in = timings.timings if isinstance(timings, SimResult) else timings
    rows = [[(a if isinstance(a, Action) else Action.parse(a), float(s), float(e)) for a, s, e in row] for row in rows_in]
    starts = [s for row in rows for _, s, _ in row]
    if not starts:
        raise ConfigError("no actions to draw: every rank's timing list is empty")
    t0 = min(starts)
    return [[(a, s - t0, e - t0) for a, s, e in row] for row in rows]


def _lighten(hex_colour: str, amount: float) -> tuple[float, float, float]:
    """Blend a colour towards white so virtual chunks of one rank stay distinguishable."""
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return tuple(c + (1 - c) * amount for c in rgb)  # type: ignore[return-value]


def _box_colour(action: Action, chunk: int, virtual_stages: int) -> tuple[tuple[float, float, float], str]:
    """Face colour by kind, lighter for later chunks; text colour readable on it."""
    base, text = _COLOURS[action.kind]
    amount = 0.55 * chunk / max(1, virtual_stages - 1)
    return _lighten(base, amount), (text if amount < 0.3 else "black")


def draw_timeline(
    timings: Union[Timings, SimResult],
    path: Union[str, Path],
    title: str = "",
    xlabel: str = "time",
    schedule: Optional[Schedule] = None,
) -> Path:
    """Write a PNG Gantt chart of per-rank (Action, start, end) timings; returns the path.

    `schedule` (taken from a SimResult when not given) says which of its rank's stages an action's
    stage is, for the shading; without one, stage s is taken as chunk s // ranks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = _as_rows(timings)
    n_ranks = len(rows)
    if schedule is None and isinstance(timings, SimResult):
        schedule = timings.schedule
    virtual = schedule.virtual_stages if schedule else 1 + max(a.stage for row in rows for a, _, _ in row) // n_ranks

    def chunk(rank: int, stage: int) -> int:
        return schedule.stages_of(rank).index(stage) if schedule else stage // n_ranks

    makespan = max(e for row in rows for _, _, e in row) or 1.0
    most = max(len(row) for row in rows)
    width_in = min(40.0, max(8.0, 0.28 * most))
    fig = Figure(figsize=(width_in, 1.4 + 0.55 * n_ranks), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points_per_unit = 0.85 * width_in * 72 / makespan
    for r, row in enumerate(rows):
        for a, start, end in row:
            face, text = _box_colour(a, chunk(r, a.stage), virtual)
            ax.broken_barh([(start, end - start)], (r - 0.4, 0.8), facecolors=[face], edgecolors="black", linewidth=0.4)
            if (end - start) * points_per_unit >= _MIN_LABEL_PT:
                ax.text((start + end) / 2, r, str(a.microbatch), ha="center", va="center", fontsize=7, color=text)
    ax.set_xlim(0, makespan)
    ax.set_ylim(n_ranks - 0.5, -0.5)
    ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
    ax.set_xlabel(xlabel)
    kinds = sorted({a.kind for row in rows for a, _, _ in row}, key="FBW".index)
    ax.legend(handles=[Patch(color=_COLOURS[k][0], label=_KIND_NAMES[k]) for k in kinds],
              title="lighter = later chunk" if virtual > 1 else None, title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pp_runtime.training.timeline", description="Validate, simulate and draw a pipeline schedule."
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--schedule", type=_schedule_name, metavar="NAME",
                     help=f"built-in schedule: {', '.join(SCHEDULE_NAMES)} (zb_h1 is the same as zb-h1)")
    src.add_argument("--file", type=Path, help="JSON schedule file to validate and draw")
    p.add_argument("--ranks", type=int, help="pipeline ranks (with --schedule)")
    p.add_argument("--microbatches", type=int, help="micro-batches per step (with --schedule)")
    p.add_argument("--virtual", type=int, default=None, help="virtual stages per rank (interleaved, interleaved-zb; default 2; zb-v: 2)")
    p.add_argument("--cost-f", type=float, default=1.0,
                   help="forward time of one micro-batch through one rank's layers (split evenly over its virtual stages)")
    p.add_argument("--cost-b", type=float, default=2.0, help="backward time, same convention as --cost-f")
    p.add_argument("--comm", type=float, default=0.0, help="send/recv latency between ranks")
    p.add_argument("--out", type=Path, default=Path("timeline.png"), help="PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: schedule description)")
    p.add_argument("--list", action="store_true", help="also print each rank's action list")
    return p


def _schedule_name(text: str) -> str:
    """Any spelling the fine-tuning config accepts (zb-h1 or zb_h1), as the canonical name."""
    try:
        return canonical_name(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _schedule_from_args(args: argparse.Namespace) -> Schedule:
    """Build the built-in schedule or load the user's file."""
    if args.file is not None:
        return load_schedule(args.file)
    if args.ranks is None or args.microbatches is None:
        raise ConfigError("--schedule needs --ranks and --microbatches, e.g. --schedule 1f1b --ranks 4 --microbatches 8")
    two_per_rank = ("interleaved", "interleaved-zb", "zb-v")
    virtual = args.virtual if args.virtual is not None else (2 if args.schedule in two_per_rank else 1)
    return build_schedule(args.schedule, args.ranks, args.microbatches, virtual)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: returns 0 on success, 1 with the error on stderr for an invalid schedule."""
    args = _parser().parse_args(argv)
    try:
        schedule = _schedule_from_args(args)
        v = schedule.virtual_stages
        result = simulate(schedule, cost_f=args.cost_f / v, cost_b=args.cost_b / v, comm=args.comm)
        title = args.title or (
            f"{schedule.name}: {schedule.n_ranks} ranks, {schedule.n_microbatches} micro-batches, "
            f"v={schedule.virtual_stages}, bubble {result.bubble_fraction:.1%}"
        )
        out = draw_timeline(result, args.out, title=title)
    except (PPRuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.list:
        print(schedule.format())
    print(result.summary())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
