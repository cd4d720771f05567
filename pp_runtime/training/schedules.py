"""Pipeline schedules as pure data: for each rank, the ordered actions it runs.

An action is (kind, microbatch, stage). `stage` is the global (virtual) stage index. Which rank
holds which stage is part of the schedule (`Schedule.stage_ranks`): by default the interleaved
layout, stage s on rank s % n_ranks (with one virtual stage per rank stage s is rank s); the V
layout of ZB-V puts stages r and 2p-1-r on rank r. Kinds:

- ``F``: forward of one micro-batch through one stage;
- ``B``: backward of it (input grad + weight grad, or input grad only when a ``W`` follows);
- ``W``: weight-grad-only backward, for zero-bubble variants that split ``B``.

The executor interprets these lists and derives communication from them; the simulator
(`pp_runtime.training.simulator`) checks them for completeness, order and deadlock.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from pp_runtime.errors import ConfigError

FORWARD = "F"
BACKWARD = "B"
WEIGHT = "W"
KINDS = (FORWARD, BACKWARD, WEIGHT)

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "interleaved-zb")
_ALIASES = {
    "gpipe": "gpipe",
    "1f1b": "1f1b",
    "pipedream-flush": "1f1b",
    "interleaved": "interleaved",
    "interleaved-1f1b": "interleaved",
    "interleaved_1f1b": "interleaved",
    "zb-h1": "zb-h1",
    "zb_h1": "zb-h1",
    "zbh1": "zb-h1",
    "zero-bubble": "zb-h1",
    "zb-v": "zb-v",
    "zb_v": "zb-v",
    "interleaved-zb": "interleaved-zb",
    "interleaved_zb": "interleaved-zb",
}
_ACTION_RE = re.compile(r"^\s*([FBW])\s*(\d+)\s*@\s*(\d+)\s*$")


@dataclass(frozen=True)
class Action:
    """One unit of pipeline work: `kind` of micro-batch `microbatch` on global stage `stage`."""

    kind: str
    microbatch: int
    stage: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"action kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.microbatch < 0 or self.stage < 0:
            raise ConfigError(f"action {self.kind}{self.microbatch}@{self.stage}: micro-batch and stage must be >= 0")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.stage}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Read the compact form "F3@1" (forward of micro-batch 3 on stage 1)."""
        match = _ACTION_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(
                f"cannot read action {text!r}: write KIND MICROBATCH@STAGE, e.g. 'F3@1', with KIND one of F, B, W"
            )
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered action lists plus the shape they were built for."""

    n_ranks: int
    n_microbatches: int
    virtual_stages: int
    actions: tuple[tuple[Action, ...], ...]
    name: str = "custom"
    stage_ranks: tuple[int, ...] = ()  # rank of each global stage; empty = interleaved (s % n_ranks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(row) for row in self.actions))
        _check_positive("n_ranks", self.n_ranks)
        _check_positive("n_microbatches", self.n_microbatches)
        _check_positive("virtual_stages", self.virtual_stages)
        if len(self.actions) != self.n_ranks:
            raise ConfigError(
                f"schedule {self.name!r} has action lists for {len(self.actions)} ranks but n_ranks={self.n_ranks}; "
                "give exactly one list per rank"
            )
        ranks = tuple(self.stage_ranks) or interleaved_placement(self.n_ranks, self.virtual_stages)
        _check_placement(self.name, ranks, self.n_ranks, self.virtual_stages)
        object.__setattr__(self, "stage_ranks", ranks)

    @property
    def n_stages(self) -> int:
        return self.n_ranks * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """Rank that holds global stage `stage`."""
        return self.stage_ranks[stage]

    def stages_of(self, rank: int) -> list[int]:
        """Global stages held by `rank`, in model order."""
        return [s for s, r in enumerate(self.stage_ranks) if r == rank]

    def format(self) -> str:
        """Human-readable listing, one line per rank."""
        return "\n".join(f"rank {r}: {' '.join(map(str, acts))}" for r, acts in enumerate(self.actions))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of `schedule_from_dict`."""
        return {
            "name": self.name,
            "n_ranks": self.n_ranks,
            "n_microbatches": self.n_microbatches,
            "virtual_stages": self.virtual_stages,
            "stage_ranks": list(self.stage_ranks),
            "actions": [[str(a) for a in acts] for acts in self.actions],
        }


def interleaved_placement(n_ranks: int, virtual_stages: int) -> tuple[int, ...]:
    """Stage s on rank s % n_ranks: rank r holds r, r + p, r + 2p, ... (one stage per rank: s on s)."""
    return tuple(s % n_ranks for s in range(n_ranks * virtual_stages))


def v_placement(n_ranks: int) -> tuple[int, ...]:
    """The V of ZB-V: rank r holds stages r and 2p-1-r, so rank 0 holds both the first and the last."""
    return tuple(range(n_ranks)) + tuple(reversed(range(n_ranks)))


def _check_placement(name: str, ranks: tuple[int, ...], n_ranks: int, virtual_stages: int) -> None:
    """Every stage on a valid rank, every rank holding exactly `virtual_stages` stages."""
    n_stages = n_ranks * virtual_stages
    if len(ranks) != n_stages or any(not isinstance(r, int) or not 0 <= r < n_ranks for r in ranks):
        raise ConfigError(
            f"schedule {name!r}: stage_ranks={list(ranks)} must give a rank in 0..{n_ranks - 1} for each of the "
            f"{n_stages} stages ({n_ranks} ranks x {virtual_stages} virtual)"
        )
    uneven = [r for r in range(n_ranks) if ranks.count(r) != virtual_stages]
    if uneven:
        raise ConfigError(
            f"schedule {name!r}: stage_ranks={list(ranks)} gives rank(s) {uneven} other than {virtual_stages} stage(s); "
            "every rank must hold virtual_stages stages"
        )


def dependencies(action: Action, n_stages: int) -> tuple[Action, ...]:
    """Actions that must finish before `action` may start: F(m, s) needs F(m, s-1); B(m, s) needs
    F(m, s) and B(m, s+1); W(m, s) needs B(m, s)."""
    m, s = action.microbatch, action.stage
    if action.kind == FORWARD:
        return (Action(FORWARD, m, s - 1),) if s > 0 else ()
    if action.kind == BACKWARD:
        upstream = (Action(BACKWARD, m, s + 1),) if s < n_stages - 1 else ()
        return (Action(FORWARD, m, s),) + upstream
    return (Action(BACKWARD, m, s),)


def _is_count(value: Any) -> bool:
    """True for an int >= 1; bools are excluded so a stray `true` in a config is not read as 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_positive(field: str, value: Any) -> None:
    """Reject non-integer or < 1 shape values with the field name in the message."""
    if not _is_count(value):
        raise ConfigError(f"{field}={value!r}: must be an integer >= 1")


def _make(name: str, n_ranks: int, n_microbatches: int, virtual_stages: int, per_rank: Iterable[Iterable[Action]],
          stage_ranks: tuple[int, ...] = ()) -> Schedule:
    """Freeze per-rank lists into a Schedule (tuples keep it hashable and comparable)."""
    return Schedule(n_ranks, n_microbatches, virtual_stages, tuple(tuple(a) for a in per_rank), name, stage_ranks)


def _check_shape(n_ranks: int, n_microbatches: int) -> None:
    """Reject pipeline shapes no schedule can run, naming the config key to change."""
    if not _is_count(n_ranks):
        raise ConfigError(f"pipeline.stages={n_ranks!r}: need at least one stage (an integer >= 1)")
    if not _is_count(n_microbatches):
        raise ConfigError(f"schedule.microbatches={n_microbatches!r}: need at least 1 micro-batch; set schedule.microbatches>=1")


def schedule_gpipe(n_ranks: int, n_microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards; simple, but holds every micro-batch's activations."""
    _check_shape(n_ranks, n_microbatches)
    m = range(n_microbatches)
    per_rank = [[Action(FORWARD, i, r) for i in m] + [Action(BACKWARD, i, r) for i in m] for r in range(n_ranks)]
    return _make("gpipe", n_ranks, n_microbatches, 1, per_rank)


def _one_f_one_b(forwards: Sequence[Action], backwards: Sequence[Action], warmup: int) -> list[Action]:
    """Warm up with `warmup` forwards, alternate one forward / one backward, then drain backwards."""
    warmup = min(warmup, len(forwards))
    out = list(forwards[:warmup])
    steady = len(forwards) - warmup
    for i in range(steady):
        out += [forwards[warmup + i], backwards[i]]
    out += backwards[steady:]
    return out


def schedule_1f1b(n_ranks: int, n_microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B: same bubble as GPipe but rank r holds at most p - r activations."""
    _check_shape(n_ranks, n_microbatches)
    m = range(n_microbatches)
    per_rank = [
        _one_f_one_b([Action(FORWARD, i, r) for i in m], [Action(BACKWARD, i, r) for i in m], n_ranks - r - 1)
        for r in range(n_ranks)
    ]
    return _make("1f1b", n_ranks, n_microbatches, 1, per_rank)


def schedule_zb_h1(n_ranks: int, n_microbatches: int) -> Schedule:
    """ZB-H1 zero-bubble schedule (Qi et al., 2023): 1F1B with each backward split into B (input
    gradient, on the critical path) and W (weight gradient, which nothing downstream waits for).

    Rank r runs its W actions r micro-batches late, which fills the cool-down bubble: with equal
    F, B and W times the bubble shrinks from (p-1)(F+B+W) to (p-1)(F+B-W), a third of 1F1B's,
    while no rank holds more than p micro-batches' activations (1F1B's worst rank)."""
    _check_shape(n_ranks, n_microbatches)
    p, m = n_ranks, n_microbatches
    per_rank = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        acts = [Action(FORWARD, i, r) for i in range(warmup)]
        for i in range(m):
            if warmup + i < m:
                acts.append(Action(FORWARD, warmup + i, r))
            acts.append(Action(BACKWARD, i, r))
            if i >= r:
                acts.append(Action(WEIGHT, i - r, r))
        acts += [Action(WEIGHT, i, r) for i in range(max(0, m - r), m)]
        per_rank.append(acts)
    return _make("zb-h1", p, m, 1, per_rank)


def _interleaved_groups(n_ranks: int, n_microbatches: int) -> list[range]:
    """Micro-batch groups of n_ranks; a remainder joins the first group (at the end it would deadlock)."""
    m, p = n_microbatches, n_ranks
    if m < p:
        return [range(m)]
    first = p + m % p
    return [range(0, first)] + [range(start, start + p) for start in range(first, m, p)]


def _interleaved_order(groups: Sequence[range], virtual_stages: int, backward: bool) -> list[tuple[int, int]]:
    """(microbatch, local chunk) order: each group of micro-batches goes through every chunk in turn."""
    chunks = list(range(virtual_stages))
    if backward:
        chunks.reverse()
    return [(mb, c) for group in groups for c in chunks for mb in group]


def schedule_interleaved_1f1b(n_ranks: int, n_microbatches: int, virtual_stages: int) -> Schedule:
    """Megatron interleaved 1F1B: v model chunks per rank cut the bubble to (p-1)/(v*m+p-1).

    Rank r holds chunks (stages) r, r+p, ..., r+(v-1)p. Any m >= 1 works; when m is not a multiple
    of p the spare micro-batches join the first group, which raises peak activations a little.
    """
    _check_shape(n_ranks, n_microbatches)
    if not _is_count(virtual_stages) or virtual_stages < 2:
        raise ConfigError(
            f"interleaved schedule with virtual_stages={virtual_stages!r}: needs at least 2 virtual stages per rank; "
            "set schedule.virtual_stages>=2 or use 1f1b"
        )
    p, v, m = n_ranks, virtual_stages, n_microbatches
    groups = _interleaved_groups(p, m)
    fwd_order = _interleaved_order(groups, v, backward=False)
    bwd_order = _interleaved_order(groups, v, backward=True)
    warmup_base = (v - 1) * len(groups[0])
    per_rank = []
    for r in range(p):
        forwards = [Action(FORWARD, mb, c * p + r) for mb, c in fwd_order]
        backwards = [Action(BACKWARD, mb, c * p + r) for mb, c in bwd_order]
        per_rank.append(_one_f_one_b(forwards, backwards, warmup_base + 2 * (p - r - 1)))
    return _make("interleaved", p, m, v, per_rank)


def schedule_interleaved_zb(n_ranks: int, n_microbatches: int, virtual_stages: int) -> Schedule:
    """Interleaved 1F1B with each backward split into B (input gradient) and W (weight gradient),
    the W's postponed into the bubbles (the interleaved variant of ZB-H1).

    The F/B order is Megatron's interleaved one; rank r keeps at most r weight gradients waiting,
    as ZB-H1 does. With equal F, B and W times the makespan is 3vm + p - 1 chunk-units (the
    cool-down bubble filled); no rank holds more activations than interleaved 1F1B's worst rank
    (rank 0), though the later ranks hold more than they did."""
    base = schedule_interleaved_1f1b(n_ranks, n_microbatches, virtual_stages)
    rows = _postpone_weight_grads(base, most_pending=range(n_ranks))
    return _make("interleaved-zb", n_ranks, n_microbatches, virtual_stages, rows)


def _postpone_weight_grads(schedule: Schedule, most_pending: Sequence[int]) -> list[list[Action]]:
    """`schedule`'s F/B order with every B followed, sooner or later, by its W.

    Rank r runs its oldest waiting W when its next F or B still waits for another rank (a bubble)
    or when more than most_pending[r] W's wait (each holds its layers' saved inputs). Decided on a
    clock where F, B and W each take one unit; the F/B order is unchanged and W's have no
    cross-rank dependants, so the result is deadlock-free whatever the real times are."""
    todo = [deque(row) for row in schedule.actions]
    waiting: list[deque[Action]] = [deque() for _ in todo]
    rows: list[list[Action]] = [[] for _ in todo]
    finished_at: dict[Action, int] = {}
    t = 0
    while any(todo) or any(waiting):
        finished, progressed = [], False
        for r, queue in enumerate(todo):
            nxt = queue[0] if queue else None
            ready = nxt is not None and all(finished_at.get(d, t + 1) <= t for d in dependencies(nxt, schedule.n_stages))
            if waiting[r] and (len(waiting[r]) > most_pending[r] or not ready):
                rows[r].append(waiting[r].popleft())
                progressed = True
            elif ready:
                queue.popleft()
                rows[r].append(nxt)
                finished.append(nxt)
                progressed = True
                if nxt.kind == BACKWARD:
                    waiting[r].append(Action(WEIGHT, nxt.microbatch, nxt.stage))
        if not progressed:
            raise ConfigError(f"schedule {schedule.name!r} deadlocks; it cannot take the B/W split")
        for a in finished:
            finished_at[a] = t + 1
        t += 1
    return rows


def schedule_zb_v(n_ranks: int, n_microbatches: int) -> Schedule:
    """ZB-V (Qi et al., 2024): two stages per rank placed in a V (rank r holds stage r on the way
    down and stage 2p-1-r on the way back), backwards split into B and W.

    Rank 0 holds both the first and the last stage, so a micro-batch's loss is computed where its
    backward starts and the V's two halves take turns without a cross-pipeline hop. With equal F, B
    and W times the makespan is 6m + p - 1 chunk-units once m >= 2p - 1 (no bubble but the fill of
    the first p - 1 ranks), at 1F1B's peak activation memory (2p chunks = p micro-batches of a
    rank's layers). The order is built for max(m, 2p - 1) micro-batches and the surplus dropped:
    removing whole micro-batches keeps a valid order valid."""
    _check_shape(n_ranks, n_microbatches)
    p, m = n_ranks, n_microbatches
    n = max(m, 2 * p - 1)
    per_rank = []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        count = {(kind, s): 0 for kind in KINDS for s in (down, up)}
        acts: list[Action] = []

        def run(kind: str, stage: int) -> None:
            acts.append(Action(kind, count[kind, stage], stage))
            count[kind, stage] += 1

        # warm-up: forwards down the V until the first micro-batches come back up it
        for _ in range(2 * (p - r) - 1):
            run(FORWARD, down)
        for _ in range(r):
            run(FORWARD, up)
            run(FORWARD, down)
        for _ in range(p - r):
            run(FORWARD, up)
            run(BACKWARD, up)
            run(WEIGHT, up)
        # steady state: one micro-batch's F, B and W on each half in turn
        while count[FORWARD, up] < count[FORWARD, down] or count[FORWARD, down] < n:
            if count[FORWARD, down] < n:
                run(FORWARD, down)
            for kind in (BACKWARD, WEIGHT):
                run(kind, down)
            for kind in (FORWARD, BACKWARD, WEIGHT):
                run(kind, up)
        # cool-down: the input gradients the other ranks wait for first, weight gradients after
        for _ in range(r):
            run(BACKWARD, down)
            run(BACKWARD, up)
        for _ in range(p - r):
            run(BACKWARD, down)
            run(WEIGHT, down)
        for stage in (up, down):
            while count[WEIGHT, stage] < n:
                run(WEIGHT, stage)
        per_rank.append([a for a in acts if a.microbatch < m])
    return _make("zb-v", p, m, 2, per_rank, v_placement(p))


def canonical_name(name: str) -> str:
    """Map a schedule name or alias (case-insensitive) to one of SCHEDULE_NAMES."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ConfigError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULE_NAMES)}")
    return _ALIASES[key]


def build_schedule(name: str, n_ranks: int, n_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Build a built-in schedule by name: one of SCHEDULE_NAMES (or an alias)."""
    kind = canonical_name(name)
    if kind == "interleaved":
        return schedule_interleaved_1f1b(n_ranks, n_microbatches, virtual_stages)
    if kind == "interleaved-zb":
        return schedule_interleaved_zb(n_ranks, n_microbatches, virtual_stages)
    if kind == "zb-v":
        if virtual_stages != 2:
            raise ConfigError(f"schedule zb-v runs two stages per rank (a V) but virtual_stages={virtual_stages}; "
                              "set schedule.virtual_stages=2")
        return schedule_zb_v(n_ranks, n_microbatches)
    if virtual_stages != 1:
        raise ConfigError(
            f"schedule {kind!r} runs one stage per rank but virtual_stages={virtual_stages}; "
            "set schedule.virtual_stages=1 or use schedule interleaved"
        )
    one_stage_per_rank = {"gpipe": schedule_gpipe, "1f1b": schedule_1f1b, "zb-h1": schedule_zb_h1}
    return one_stage_per_rank[kind](n_ranks, n_microbatches)


def check_microbatches(name: str, n_ranks: int, n_microbatches: int) -> None:
    """Reject micro-batch counts that leave a 1F1B-style pipeline never reaching its steady state."""
    kind = canonical_name(name)
    _check_shape(n_ranks, n_microbatches)
    label = {"1f1b": "1F1B", "interleaved": "interleaved 1F1B", "zb-h1": "ZB-H1", "zb-v": "ZB-V",
             "interleaved-zb": "interleaved 1F1B with the B/W split"}.get(kind)
    if label and n_microbatches < n_ranks:
        raise ConfigError(
            f"{label} needs at least as many micro-batches as stages (got {n_microbatches} for {n_ranks} stages); "
            f"set schedule.microbatches>={n_ranks} or use gpipe"
        )


def _read_action_list(raw: Any, rank: int) -> tuple[Action, ...]:
    """One rank's actions from a list of "F0@1" strings or one whitespace-separated string."""
    items = raw.split() if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ConfigError(f"actions for rank {rank} must be a list of strings like 'F0@{rank}' (got {type(raw).__name__})")
    try:
        return tuple(Action.parse(item) for item in items)
    except ConfigError as err:
        raise ConfigError(f"rank {rank}: {err}") from None


def schedule_from_dict(data: Any, default_name: str = "custom") -> Schedule:
    """Build a Schedule from its JSON form; n_ranks and virtual_stages may be omitted."""
    if not isinstance(data, dict) or "actions" not in data or "n_microbatches" not in data:
        raise ConfigError(
            'a schedule must be a JSON object with "n_microbatches" and "actions" (one list per rank, '
            'e.g. [["F0@0", "B0@0"], ["F0@1", "B0@1"]]); "n_ranks" and "virtual_stages" are optional'
        )
    raw_actions = data["actions"]
    if not isinstance(raw_actions, list) or not raw_actions:
        raise ConfigError('"actions" must be a non-empty list with one list of actions per rank')
    actions = tuple(_read_action_list(raw, r) for r, raw in enumerate(raw_actions))
    return Schedule(
        n_ranks=data.get("n_ranks", len(actions)),
        n_microbatches=data["n_microbatches"],
        virtual_stages=data.get("virtual_stages", 1),
        actions=actions,
        name=str(data.get("name", default_name)),
        stage_ranks=_read_stage_ranks(data.get("stage_ranks")),
    )


def _read_stage_ranks(raw: Any) -> tuple[int, ...]:
    """The optional "stage_ranks" list of a schedule file (absent: the interleaved layout)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in raw):
        raise ConfigError(f'"stage_ranks" must be a list of integers, the rank of each stage (got {raw!r})')
    return tuple(raw)


PathLike = Union[str, Path]


def load_schedule(path: PathLike) -> Schedule:
    """Read a user schedule from JSON (see `Schedule.to_dict` for the format); not validated here."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"schedule file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"schedule file {str(path)!r} is not valid JSON: {err}") from None
    return schedule_from_dict(data, default_name=path.stem)


def save_schedule(schedule: Schedule, path: PathLike) -> None:
    """Write a schedule as JSON, one rank's actions per line so diffs stay readable."""
    d = schedule.to_dict()
    rows = ",\n    ".join(json.dumps(acts) for acts in d.pop("actions"))
    head = json.dumps(d)[:-1]
    Path(path).write_text(f'{head}, "actions": [\n    {rows}\n]}}\n')
