"""Run a schedule on paper: check it is complete, ordered and deadlock-free; time it.

Each rank executes its actions strictly in list order, starting each one as soon as the rank is
free and its dependencies have finished (plus `comm` when a dependency ran on another rank):

- F(m, s) needs F(m, s-1);
- B(m, s) needs F(m, s) and B(m, s+1);
- W(m, s) needs B(m, s) (when a schedule splits the backward, B is input-grad only).

Costs are per action on one (virtual) stage. With interleaving each virtual stage holds about
1/v of a rank's layers, so divide the costs by v to compare makespans with a 1-stage schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Sequence, Union

from pp_runtime.errors import ConfigError
from pp_runtime.training.schedules import BACKWARD, FORWARD, WEIGHT, Action, Schedule, dependencies

Timed = tuple[Action, float, float]
Timings = Sequence[Sequence[Timed]]
Cost = Union[float, Sequence[float]]
Position = tuple[int, int]
Split = AbstractSet[tuple[int, int]]  # (microbatch, stage) pairs whose backward is B + W

_MAX_LISTED = 5


class ScheduleError(ConfigError):
    """A schedule is incomplete, mis-ordered or deadlocks."""


@dataclass(frozen=True)
class SimResult:
    """Simulated timings and the figures derived from them."""

    schedule: Schedule
    timings: tuple[tuple[Timed, ...], ...]
    makespan: float
    busy: tuple[float, ...]
    bubble_fraction: float
    peak_activations: tuple[int, ...]

    @property
    def max_peak_activations(self) -> int:
        """Worst rank's peak: the one that sizes activation memory."""
        return max(self.peak_activations)

    def summary(self) -> str:
        """Two-line report for logs and the timeline CLI."""
        s = self.schedule
        return (
            f"schedule {s.name}: {s.n_ranks} ranks, {s.n_microbatches} micro-batches, {s.virtual_stages} virtual stage(s)\n"
            f"makespan {self.makespan:g}, bubble fraction {self.bubble_fraction:.4f}, "
            f"peak activations per rank {list(self.peak_activations)}"
        )


def _listed(items: Sequence[str]) -> str:
    """Comma-join at most _MAX_LISTED items, saying how many more were left out."""
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" (and {more} more)" if more > 0 else "")


def _positions(schedule: Schedule) -> dict[Action, Position]:
    """Map each action to (rank, step); rejects out-of-range, misplaced and duplicate actions."""
    pos: dict[Action, Position] = {}
    bad: list[str] = []
    dups: list[str] = []
    for r, acts in enumerate(schedule.actions):
        for i, a in enumerate(acts):
            problem = _placement_problem(schedule, a, r)
            if problem:
                bad.append(f"rank {r} step {i} ({a}): {problem}")
            elif a in pos:
                dups.append(f"{a} at rank {pos[a][0]} step {pos[a][1]} and rank {r} step {i}")
            else:
                pos[a] = (r, i)
    if bad:
        raise ScheduleError(f"schedule {schedule.name!r} has invalid actions: {_listed(bad)}")
    if dups:
        raise ScheduleError(f"schedule {schedule.name!r} has duplicate actions (each must appear once): {_listed(dups)}")
    return pos


def _placement_problem(schedule: Schedule, a: Action, rank: int) -> str:
    """Why action `a` cannot be listed on `rank`, or '' if it can."""
    if a.microbatch >= schedule.n_microbatches:
        return f"micro-batch {a.microbatch} out of range (n_microbatches={schedule.n_microbatches})"
    if a.stage >= schedule.n_stages:
        shape = f"{schedule.n_ranks} ranks x {schedule.virtual_stages} virtual"
        return f"stage {a.stage} out of range ({schedule.n_stages} stages = {shape})"
    if schedule.rank_of(a.stage) != rank:
        home = schedule.rank_of(a.stage)
        return f"stage {a.stage} lives on rank {home} (schedule.stage_ranks); move it there"
    return ""


def _check_complete(schedule: Schedule, pos: dict[Action, Position]) -> None:
    """Every micro-batch must pass every stage forward and backward."""
    missing = [
        str(Action(kind, m, s))
        for m in range(schedule.n_microbatches)
        for s in range(schedule.n_stages)
        for kind in (FORWARD, BACKWARD)
        if Action(kind, m, s) not in pos
    ]
    if missing:
        raise ScheduleError(
            f"schedule {schedule.name!r} is missing {len(missing)} action(s): {_listed(missing)}; "
            "every micro-batch needs one F and one B on every stage"
        )


def _check_same_rank_order(schedule: Schedule, pos: dict[Action, Position]) -> None:
    """A dependency on the same rank must come earlier in that rank's list."""
    for a, (r, i) in pos.items():
        for d in dependencies(a, schedule.n_stages):
            dr, di = pos[d]
            if dr == r and di > i:
                raise ScheduleError(
                    f"out-of-order dependency: rank {r} step {i} ({a}) needs {d}, which rank {r} runs later, "
                    f"at step {di}; move {d} before {a}"
                )


def validate(schedule: Schedule) -> dict[Action, Position]:
    """Check placement, duplicates, completeness and same-rank order; return action positions."""
    pos = _positions(schedule)
    _check_complete(schedule, pos)
    _check_same_rank_order(schedule, pos)
    return pos


def _split_backwards(pos: dict[Action, Position]) -> Split:
    """(microbatch, stage) pairs whose backward is split into B (input grad) + W (weight grad)."""
    return {(a.microbatch, a.stage) for a in pos if a.kind == WEIGHT}


def _cost_at(cost: Cost, stage: int, n_stages: int, what: str) -> float:
    """A scalar cost, or the entry for `stage` of a per-stage list."""
    if isinstance(cost, (int, float)):
        return float(cost)
    if len(cost) != n_stages:
        raise ScheduleError(f"{what} has {len(cost)} entries but the schedule has {n_stages} stages; give one per stage")
    return float(cost[stage])


def _duration(a: Action, split: bool, n_stages: int, cost_f: Cost, cost_b: Cost, cost_w: Cost | None) -> float:
    """Time one action takes; a split backward shares cost_b between its B and W."""
    if a.kind == FORWARD:
        return _cost_at(cost_f, a.stage, n_stages, "cost_f")
    full_b = _cost_at(cost_b, a.stage, n_stages, "cost_b")
    w = full_b / 2 if cost_w is None else _cost_at(cost_w, a.stage, n_stages, "cost_w")
    if a.kind == WEIGHT:
        return w
    return full_b - w if split else full_b


def _deadlock_message(schedule: Schedule, ptr: list[int], done: dict[Action, float], pos: dict[Action, Position]) -> str:
    """Name the cycle of ranks waiting on each other, with steps and actions."""
    waits: dict[int, tuple[int, Action, Action]] = {}
    for r, acts in enumerate(schedule.actions):
        if ptr[r] < len(acts):
            a = acts[ptr[r]]
            dep = next(d for d in dependencies(a, schedule.n_stages) if d not in done)
            waits[r] = (ptr[r], a, dep)
    chain: list[int] = []
    r = min(waits)
    while r not in chain:
        chain.append(r)
        r = pos[waits[r][2]][0]
    cycle = chain[chain.index(r):]
    parts = [
        f"rank {q} stuck at step {waits[q][0]} ({waits[q][1]}) waiting for {waits[q][2]}, "
        f"which rank {pos[waits[q][2]][0]} runs at step {pos[waits[q][2]][1]}"
        for q in cycle
    ]
    others = [f"rank {q} at step {waits[q][0]} ({waits[q][1]})" for q in sorted(waits) if q not in cycle]
    tail = f" (also blocked: {', '.join(others)})" if others else ""
    return (
        f"deadlock in schedule {schedule.name!r}: " + "; ".join(parts) + tail
        + ". Reorder so that each awaited action comes before the step that blocks its rank"
    )


def simulate(
    schedule: Schedule,
    cost_f: Cost = 1.0,
    cost_b: Cost = 2.0,
    comm: float = 0.0,
    cost_w: Cost | None = None,
) -> SimResult:
    """Validate `schedule` and time it; raises ScheduleError naming the problem and the fix."""
    pos = validate(schedule)
    split = _split_backwards(pos)
    n_stages = schedule.n_stages
    deps = {a: dependencies(a, n_stages) for a in pos}
    done: dict[Action, float] = {}
    timings: list[list[Timed]] = [[] for _ in range(schedule.n_ranks)]
    ptr = [0] * schedule.n_ranks
    free = [0.0] * schedule.n_ranks
    while len(done) < len(pos):
        progressed = False
        for r, acts in enumerate(schedule.actions):
            while ptr[r] < len(acts) and all(d in done for d in deps[acts[ptr[r]]]):
                a = acts[ptr[r]]
                ready = [done[d] + (comm if pos[d][0] != r else 0.0) for d in deps[a]]
                start = max([free[r], *ready])
                end = start + _duration(a, (a.microbatch, a.stage) in split, n_stages, cost_f, cost_b, cost_w)
                timings[r].append((a, start, end))
                done[a], free[r] = end, end
                ptr[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(_deadlock_message(schedule, ptr, done, pos))
    return _result(schedule, timings, split)


def _result(schedule: Schedule, timings: list[list[Timed]], split: Split) -> SimResult:
    """Derive makespan, bubble and peak activations from per-rank timings."""
    makespan = max((t[-1][2] for t in timings if t), default=0.0)
    busy = tuple(sum(end - start for _, start, end in t) for t in timings)
    bubble = 1.0 - sum(busy) / (schedule.n_ranks * makespan) if makespan > 0 else 0.0
    peaks = tuple(peak_activations(acts, split) for acts in schedule.actions)
    return SimResult(schedule, tuple(map(tuple, timings)), makespan, busy, bubble, peaks)


def peak_activations(actions: Sequence[Action], split: Split = frozenset()) -> int:
    """Most (microbatch, stage) activations one rank holds: F done, its backward not yet done."""
    held = peak = 0
    for a in actions:
        if a.kind == FORWARD:
            held += 1
            peak = max(peak, held)
        elif (a.kind == WEIGHT) == ((a.microbatch, a.stage) in split):
            held -= 1
    return peak
