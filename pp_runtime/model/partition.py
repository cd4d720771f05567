"""Stage partitioner: a pure function from per-layer costs to a plan of contiguous stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from pp_runtime.errors import ConfigError
from pp_runtime.model.args import ModelArgs


@dataclass(frozen=True)
class StageSpec:
    """One (virtual) stage: global layers [first, last), plus embedding and/or norm+head."""

    index: int
    rank: int
    first: int
    last: int
    has_embedding: bool
    has_head: bool
    cost: float = 0.0

    @property
    def layers(self) -> range:
        return range(self.first, self.last)


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[StageSpec, ...]
    n_ranks: int

    @property
    def virtual_stages(self) -> int:
        return len(self.stages) // self.n_ranks

    def for_rank(self, rank: int) -> list[StageSpec]:
        return [s for s in self.stages if s.rank == rank]

    @property
    def bottleneck(self) -> float:
        return max(s.cost for s in self.stages)

    @property
    def split(self) -> list[int]:
        return [s.last - s.first for s in self.stages]

    def rank_cost(self, rank: int) -> float:
        """What one rank computes per micro-batch: the sum of its stages' costs."""
        return sum(s.cost for s in self.for_rank(rank))

    def describe(self) -> str:
        lines = []
        total = sum(s.cost for s in self.stages) or 1.0
        for s in self.stages:
            parts = (["embedding"] if s.has_embedding else []) + [f"layers {s.first}-{s.last - 1}" if s.last > s.first else "no layers"]
            parts += ["norm+head"] if s.has_head else []
            lines.append(f"  stage {s.index} (rank {s.rank}): {', '.join(parts)}  [cost {100 * s.cost / total:.1f}%]")
        if self.virtual_stages > 1:
            loads = ", ".join(f"{100 * self.rank_cost(r) / total:.1f}%" for r in range(self.n_ranks))
            lines.append(f"  per rank: {loads}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LayerCosts:
    embedding: float
    blocks: tuple[float, ...]
    head: float


def model_costs(args: ModelArgs, *, training: bool = False, context: int = 2048) -> LayerCosts:
    """Relative cost of each unit.

    Training and prefill are compute-bound: FLOPs per token (MoE counts its active experts, the head
    its matmul plus the loss). Decode is bound by reading weights: for inference the cost is the
    weight bytes, where a MoE block reads all its experts.
    """
    d, hd = args.dim, args.head_dim
    attn_params = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn_params = 3 * d * args.hidden_dim
    n_exp = args.moe.num_experts if args.moe else 1
    active = args.moe.num_experts_per_tok if args.moe else 1
    head_params = d * args.vocab_size
    if training:
        attn_ctx = 2 * args.n_heads * hd * min(context, args.window)
        block = 2 * (attn_params + active * ffn_params) + attn_ctx
        head = 2 * head_params + 5 * args.vocab_size
        return LayerCosts(embedding=float(d), blocks=(float(block),) * args.n_layers, head=float(head))
    block = attn_params + n_exp * ffn_params + (d * n_exp if args.moe else 0)
    return LayerCosts(embedding=float(d), blocks=(float(block),) * args.n_layers, head=float(head_params))


def _stage_cost(costs: LayerCosts, a: int, b: int, first: bool, last: bool) -> float:
    return sum(costs.blocks[a:b]) + (costs.embedding if first else 0.0) + (costs.head if last else 0.0)


def partition(
    costs: LayerCosts,
    n_ranks: int,
    virtual_stages: int = 1,
    split: Optional[Sequence[int]] = None,
    stage_ranks: Optional[Sequence[int]] = None,
) -> StagePlan:
    """Split the blocks into `n_ranks * virtual_stages` contiguous stages minimising the slowest
    one, then, among such splits, the busiest rank (a rank runs all its stages per micro-batch).

    Stage s lives on rank stage_ranks[s] (the schedule's map; default s % n_ranks, the interleaved
    layout). The embedding goes with the first stage and the norm+head with the last: in the V
    layout both are on rank 0, so the blocks move off rank 0's stages until the ranks are balanced
    as far as whole blocks allow.
    """
    n_layers = len(costs.blocks)
    if n_ranks < 1:
        raise ConfigError(f"pipeline.stages={n_ranks}: need at least one stage")
    if virtual_stages < 1:
        raise ConfigError(f"virtual_stages={virtual_stages}: need at least 1 per rank")
    n_stages = n_ranks * virtual_stages
    ranks = list(stage_ranks) if stage_ranks is not None else [s % n_ranks for s in range(n_stages)]
    if len(ranks) != n_stages:
        raise ConfigError(f"{len(ranks)} stage ranks for {n_stages} stages ({n_ranks} ranks x {virtual_stages} virtual)")
    if split is not None:
        split = [int(x) for x in split]
        if len(split) != n_stages:
            raise ConfigError(
                f"pipeline.split has {len(split)} entries but there are {n_stages} stages "
                f"({n_ranks} ranks x {virtual_stages} virtual); give one layer count per stage"
            )
        if sum(split) != n_layers:
            raise ConfigError(f"pipeline.split={split} sums to {sum(split)} but the model has {n_layers} layers; make it sum to {n_layers}")
        if any(x < 0 for x in split):
            raise ConfigError(f"pipeline.split={split} has a negative entry")
        empty = [i for i, x in enumerate(split) if x == 0 and 0 < i < n_stages - 1]
        if empty:
            raise ConfigError(f"pipeline.split={split} leaves stage(s) {empty} with nothing to do; give each middle stage at least one layer")
        if n_stages > 1 and (split[0] == 0 and split[-1] == 0):
            raise ConfigError(f"pipeline.split={split}: first and last stages cannot both be empty")
        bounds = [0]
        for x in split:
            bounds.append(bounds[-1] + x)
    else:
        if n_stages > n_layers:
            raise ConfigError(
                f"{n_stages} stages ({n_ranks} ranks x {virtual_stages} virtual) for {n_layers} layers: "
                f"use at most {n_layers} stages (fewer GPUs, fewer virtual stages, or pipeline.data_parallel)"
            )
        bounds = _min_max_split(costs, n_stages)
        if virtual_stages > 1:  # with one stage per rank the slowest stage is the busiest rank
            bounds = _balance_ranks(costs, bounds, ranks, n_ranks)
    stages = tuple(
        StageSpec(
            index=s,
            rank=ranks[s],
            first=bounds[s],
            last=bounds[s + 1],
            has_embedding=s == 0,
            has_head=s == n_stages - 1,
            cost=_stage_cost(costs, bounds[s], bounds[s + 1], s == 0, s == n_stages - 1),
        )
        for s in range(n_stages)
    )
    return StagePlan(stages=stages, n_ranks=n_ranks)


def _balance_ranks(costs: LayerCosts, bounds: list[int], ranks: Sequence[int], n_ranks: int) -> list[int]:
    """Move stage boundaries one block at a time while that lowers the busiest rank's load (then
    the next busiest, ...) without making the slowest stage slower; each stage keeps a block."""
    last = len(bounds) - 2

    def score(b: list[int]) -> tuple[float, list[float]]:
        stage = [_stage_cost(costs, b[s], b[s + 1], s == 0, s == last) for s in range(last + 1)]
        loads = [0.0] * n_ranks
        for s, c in enumerate(stage):
            loads[ranks[s]] += c
        return max(stage), sorted(loads, reverse=True)

    slowest, best = score(bounds)
    improved = True
    while improved:
        improved = False
        for i in range(1, last + 1):
            for step in (-1, 1):
                moved = bounds[:i] + [bounds[i] + step] + bounds[i + 1:]
                if not moved[i - 1] < moved[i] < moved[i + 1]:
                    continue
                top, loads = score(moved)
                if top <= slowest + 1e-9 and loads < best:
                    bounds, best, improved = moved, loads, True
    return bounds


def _min_max_split(costs: LayerCosts, n_stages: int) -> list[int]:
    """Exact dynamic programme over contiguous splits, each stage at least one block."""
    n = len(costs.blocks)
    prefix = [0.0]
    for c in costs.blocks:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: min over splits of blocks [0, i) into s stages of the max stage cost
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        last = s == n_stages
        for i in range(s, n + 1):
            if last and i != n:
                continue
            for j in range(s - 1, i):
                c = prefix[i] - prefix[j] + (costs.embedding if s == 1 else 0.0) + (costs.head if last else 0.0)
                v = max(best[s - 1][j], c)
                if v < best[s][i] - 1e-9:
                    best[s][i], cut[s][i] = v, j
    bounds = [n]
    i = n
    for s in range(n_stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


def plan_for(
    args: ModelArgs,
    n_ranks: int,
    *,
    virtual_stages: int = 1,
    split: Optional[Sequence[int]] = None,
    training: bool = False,
    stage_ranks: Optional[Sequence[int]] = None,
) -> StagePlan:
    return partition(model_costs(args, training=training), n_ranks, virtual_stages, split, stage_ranks)
