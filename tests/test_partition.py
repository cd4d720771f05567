"""Stage partitioner: pure function tests (no processes)."""

from __future__ import annotations

import itertools
import re

import pytest

from pp_runtime.errors import ConfigError
from pp_runtime.model.args import preset
from pp_runtime.model.partition import LayerCosts, model_costs, partition, plan_for


def _brute_force_best(costs: LayerCosts, n: int) -> float:
    """Max stage cost of the best contiguous split, by trying every split: an independent check."""
    layers = len(costs.blocks)
    best = float("inf")
    for cuts in itertools.combinations(range(1, layers), n - 1):
        bounds = (0, *cuts, layers)
        worst = max(
            sum(costs.blocks[bounds[s] : bounds[s + 1]]) + (costs.embedding if s == 0 else 0) + (costs.head if s == n - 1 else 0)
            for s in range(n)
        )
        best = min(best, worst)
    return best


@pytest.mark.parametrize("model", ["mistral-7b", "mixtral-8x7b"])
@pytest.mark.parametrize("stages", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("training", [False, True])
def test_32_layer_profiles(model, stages, training):
    args = preset(model)
    plan = plan_for(args, stages, training=training)
    assert len(plan.stages) == stages
    assert [s.rank for s in plan.stages] == list(range(stages))
    assert plan.stages[0].has_embedding and plan.stages[-1].has_head
    assert sum(plan.split) == 32 and all(x >= 1 for x in plan.split)
    assert [s.first for s in plan.stages[1:]] == [s.last for s in plan.stages[:-1]]  # contiguous
    if stages <= 5:  # brute force is cheap enough up to here
        assert plan.bottleneck == pytest.approx(_brute_force_best(model_costs(args, training=training), stages))
    # the head is heavy, so the last stage never gets more blocks than the first
    assert plan.split[-1] <= plan.split[0]


def test_head_weight_moves_layers_off_the_last_stage():
    costs = LayerCosts(embedding=0.0, blocks=(1.0,) * 8, head=2.0)
    assert partition(costs, 2).split == [5, 3]
    assert partition(LayerCosts(0.0, (1.0,) * 8, 0.0), 2).split == [4, 4]


def test_heavier_moe_blocks_change_the_split():
    costs = LayerCosts(embedding=0.0, blocks=(1, 1, 1, 1, 1, 1, 6), head=0.0)
    plan = partition(costs, 2)
    assert plan.split == [6, 1] and plan.bottleneck == 6


def test_virtual_stages_interleave_ranks():
    plan = plan_for(preset("mistral-7b"), 4, virtual_stages=2, training=True)
    assert len(plan.stages) == 8 and plan.virtual_stages == 2
    assert [s.rank for s in plan.stages] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [s.index for s in plan.for_rank(1)] == [1, 5]


def test_v_placement_balances_the_ranks():
    """The V puts the embedding and the head on rank 0: of the splits with the least slowest stage,
    the one that loads the ranks most evenly is taken (checked against every split)."""
    from pp_runtime.training.schedules import v_placement

    costs = LayerCosts(embedding=0.5, blocks=(1.0,) * 7, head=3.0)
    ranks = v_placement(2)
    plan = partition(costs, 2, 2, stage_ranks=ranks)
    assert [s.rank for s in plan.stages] == [0, 1, 1, 0] and [s.index for s in plan.for_rank(0)] == [0, 3]
    assert plan.stages[0].has_embedding and plan.stages[3].has_head
    best = min(  # (slowest stage, busiest rank) over every split into 4 non-empty stages
        (max(stage), max(sum(c for c, r in zip(stage, ranks) if r == q) for q in (0, 1)))
        for cuts in itertools.combinations(range(1, 7), 3)
        for bounds in [(0, *cuts, 7)]
        for stage in [[bounds[i + 1] - bounds[i] + 0.5 * (i == 0) + 3.0 * (i == 3) for i in range(4)]]
    )
    # the slowest stage alone allows [2, 2, 2, 1], which would load rank 0 with 6.5
    assert (plan.bottleneck, max(plan.rank_cost(0), plan.rank_cost(1))) == best == (4.0, 5.5)
    args = preset("mistral-7b")
    for p in (2, 4):
        plan = plan_for(args, p, virtual_stages=2, training=True, stage_ranks=v_placement(p))
        block = model_costs(args, training=True).blocks[0]
        loads = [plan.rank_cost(r) for r in range(p)]
        assert max(loads) - min(loads) < block, (p, plan.split)


def test_explicit_split_overrides():
    plan = plan_for(preset("mistral-7b"), 4, split=[9, 8, 8, 7])
    assert plan.split == [9, 8, 8, 7]
    assert plan.stages[2].layers == range(17, 25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_ranks=40), "use at most 32 stages"),
        (dict(n_ranks=4, split=[9, 8, 8, 8]), "sums to 33 but the model has 32 layers"),
        (dict(n_ranks=4, split=[16, 16]), "has 2 entries but there are 4 stages"),
        (dict(n_ranks=3, split=[16, 0, 16]), "leaves stage(s) [1] with nothing to do"),
        (dict(n_ranks=2, split=[40, -8]), "negative entry"),
        (dict(n_ranks=0), "at least one stage"),
        (dict(n_ranks=4, virtual_stages=9), "use at most 32 stages"),
    ],
)
def test_impossible_requests_say_what_to_change(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_for(preset("mistral-7b"), **kwargs)


def test_describe_names_every_stage():
    text = plan_for(preset("mistral-7b"), 2).describe()
    assert "embedding, layers 0-15" in text and "layers 16-31, norm+head" in text
