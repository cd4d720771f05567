"""Schedules, simulator and timeline: every built-in schedule is valid and meets its formulas."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pp_runtime.errors import ConfigError
from pp_runtime.training.schedules import (
    Action,
    Schedule,
    build_schedule,
    check_microbatches,
    load_schedule,
    save_schedule,
    schedule_1f1b,
    schedule_gpipe,
    schedule_interleaved_1f1b,
    schedule_interleaved_zb,
    schedule_zb_h1,
    schedule_zb_v,
    v_placement,
)
from pp_runtime.training.simulator import ScheduleError, simulate
from pp_runtime.training.timeline import draw_timeline, main as timeline_main

RANKS = range(2, 9)
MICROBATCHES = range(1, 17)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _replace_rank(schedule: Schedule, rank: int, actions: list[str]) -> Schedule:
    """Copy of `schedule` with one rank's list replaced (to build broken schedules)."""
    rows = list(schedule.actions)
    rows[rank] = tuple(Action.parse(a) for a in actions)
    return replace(schedule, actions=tuple(rows))


def _swap(schedule: Schedule, rank: int, i: int, j: int) -> Schedule:
    row = [str(a) for a in schedule.actions[rank]]
    row[i], row[j] = row[j], row[i]
    return _replace_rank(schedule, rank, row)


# --- actions -----------------------------------------------------------------------------------


def test_action_str_and_parse_round_trip():
    a = Action("F", 3, 1)
    assert str(a) == "F3@1"
    assert Action.parse("F3@1") == a
    assert Action.parse(" B12@7 ") == Action("B", 12, 7)
    assert Action.parse(str(Action("W", 0, 5))) == Action("W", 0, 5)


@pytest.mark.parametrize("text", ["X1@0", "F1", "F@1", "F-1@0", "", "f1@0"])
def test_action_parse_rejects_bad_text(text):
    with pytest.raises(ConfigError, match="write KIND MICROBATCH@STAGE"):
        Action.parse(text)


# --- built-in schedules through the simulator ------------------------------------------------


@pytest.mark.parametrize("p", RANKS)
def test_gpipe_and_1f1b_bubble_and_memory(p):
    for m in MICROBATCHES:
        ideal = (p - 1) / (m + p - 1)
        gpipe = simulate(schedule_gpipe(p, m))
        assert gpipe.bubble_fraction == pytest.approx(ideal), (p, m)
        assert gpipe.peak_activations == (m,) * p, (p, m)
        one = simulate(schedule_1f1b(p, m))
        assert one.bubble_fraction == pytest.approx(ideal), (p, m)
        assert one.peak_activations == tuple(min(p - r, m) for r in range(p)), (p, m)
        assert one.max_peak_activations <= min(p, m)


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("p", RANKS)
def test_interleaved_passes_and_beats_1f1b(p, v):
    for m in MICROBATCHES:
        result = simulate(schedule_interleaved_1f1b(p, m, v))
        assert sum(len(row) for row in result.timings) == 2 * m * p * v
        if m >= p:
            baseline = simulate(schedule_1f1b(p, m)).bubble_fraction
            assert result.bubble_fraction < baseline, (p, m, v)
            assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1)), (p, m, v)
        if m % p == 0:  # Megatron: rank 0 warms up with (v-1)p + 2(p-1) forwards
            assert result.peak_activations[0] == min((v - 1) * p + 2 * (p - 1) + 1, v * m), (p, m, v)


@pytest.mark.parametrize("p", RANKS)
def test_zb_h1_cuts_the_bubble_to_a_third_at_1f1b_memory(p):
    """Equal F, B, W times (cost_b=2 split in half): makespan 3m + (p-1), against 1F1B's 3m + 3(p-1)."""
    for m in MICROBATCHES:
        zb = simulate(schedule_zb_h1(p, m))
        assert sum(len(row) for row in zb.timings) == 3 * m * p
        assert zb.max_peak_activations <= min(p, m), (p, m)
        one = simulate(schedule_1f1b(p, m))
        assert zb.makespan <= one.makespan, (p, m)
        if m >= p:
            assert zb.makespan == 3 * m + (p - 1), (p, m)
            assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1)), (p, m)
            assert one.makespan - 3 * m == 3 * (zb.makespan - 3 * m), (p, m)


def test_zb_h1_postpones_rank_r_weight_grads_by_r():
    s = schedule_zb_h1(4, 8)
    for r, row in enumerate(s.actions):
        kinds = "".join(a.kind for a in row)
        assert kinds.count("F") == kinds.count("B") == kinds.count("W") == 8
        b_seen = [a.microbatch for a in row if a.kind == "B"]
        first_w = kinds.index("W")
        assert kinds[:first_w].count("B") == r + 1, (r, kinds)  # r backwards run before the first W
        assert b_seen == list(range(8))
    assert [str(a) for a in s.actions[0][:6]] == ["F0@0", "F1@0", "F2@0", "F3@0", "B0@0", "W0@0"]
    assert [str(a) for a in s.actions[3][:6]] == ["F0@3", "B0@3", "F1@3", "B1@3", "F2@3", "B2@3"]


def _strip_weight_grads(schedule: Schedule) -> list[list[Action]]:
    return [[a for a in row if a.kind != "W"] for row in schedule.actions]


@pytest.mark.parametrize("p", RANKS)
def test_zb_v_has_no_bubble_but_the_fill_at_1f1b_memory(p):
    """Equal F, B and W per chunk: rank p-1 cannot start before the first micro-batch has passed
    p-1 chunks, so 6m + p - 1 is the least possible makespan; ZB-V reaches it once m >= 2p - 1,
    holding 2p chunks (p micro-batches of a rank's layers, 1F1B's worst rank) on every rank."""
    for m in range(p, 4 * p + 1):
        zbv = schedule_zb_v(p, m)
        assert zbv.stage_ranks == v_placement(p) and zbv.virtual_stages == 2
        for rank, row in enumerate(zbv.actions):
            assert {a.stage for a in row} == {rank, 2 * p - 1 - rank}
        result = simulate(zbv)
        assert sum(len(row) for row in result.timings) == 3 * m * 2 * p
        assert result.max_peak_activations <= 2 * p, (p, m)
        if m >= 2 * p - 1:
            assert result.makespan == 6 * m + p - 1, (p, m)
            # on one rank's time scale (a chunk is half a rank's layers): half ZB-H1's fill
            assert simulate(zbv, cost_f=0.5, cost_b=1.0).makespan == 3 * m + (p - 1) / 2, (p, m)


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("p", RANKS)
def test_interleaved_zb_fills_the_cool_down_at_interleaved_memory(p, v):
    """Megatron's F/B order with every B split: the W's fill the bubbles, down to the least
    possible makespan 3vm + p - 1 (equal F, B, W per chunk), with no rank holding more
    activations than interleaved 1F1B's worst rank, and rank r never more than r W's behind."""
    for m in range(p, 4 * p + 1):
        base = schedule_interleaved_1f1b(p, m, v)
        zb = schedule_interleaved_zb(p, m, v)
        assert _strip_weight_grads(zb) == [list(row) for row in base.actions], (p, m, v)
        result = simulate(zb)
        assert result.makespan == 3 * v * m + p - 1, (p, m, v)
        assert result.max_peak_activations <= simulate(base).max_peak_activations, (p, m, v)
        for rank, row in enumerate(zb.actions):
            waiting = 0
            for a in row:
                waiting += {"B": 1, "W": -1}.get(a.kind, 0)
                assert waiting <= rank + 1, (p, m, v, rank)  # r waiting plus the B just run


def test_interleaved_places_stage_s_on_rank_s_mod_p():
    s = schedule_interleaved_1f1b(4, 8, 2)
    assert s.n_stages == 8 and s.rank_of(5) == 1 and s.stages_of(1) == [1, 5]
    for rank, row in enumerate(s.actions):
        assert {a.stage for a in row} == {rank, rank + 4}


def test_build_schedule_by_name():
    assert build_schedule("gpipe", 3, 4) == schedule_gpipe(3, 4)
    assert build_schedule("1F1B", 3, 4) == schedule_1f1b(3, 4)
    assert build_schedule("interleaved", 2, 4, 3) == schedule_interleaved_1f1b(2, 4, 3)
    assert build_schedule("zero-bubble", 3, 4) == build_schedule("ZB-H1", 3, 4) == schedule_zb_h1(3, 4)
    assert build_schedule("zb_v", 3, 6, 2) == build_schedule("ZB-V", 3, 6, 2) == schedule_zb_v(3, 6)
    assert build_schedule("interleaved_zb", 2, 4, 3) == schedule_interleaved_zb(2, 4, 3)


@pytest.mark.parametrize(
    "args, match",
    [
        (("1f1b", 4, 0), r"schedule.microbatches=0: need at least 1 micro-batch"),
        (("gpipe", 0, 4), r"pipeline.stages=0"),
        (("interleaved", 4, 8, 1), r"virtual_stages=1: needs at least 2 .* set schedule.virtual_stages>=2 or use 1f1b"),
        (("1f1b", 4, 8, 2), r"set schedule.virtual_stages=1 or use schedule interleaved"),
        (("zb-h2", 4, 8), r"unknown schedule 'zb-h2': choose one of gpipe, 1f1b, interleaved, zb-h1"),
        (("zb-h1", 4, 8, 2), r"set schedule.virtual_stages=1 or use schedule interleaved"),
        (("zb-v", 4, 8, 1), r"zb-v runs two stages per rank \(a V\) but virtual_stages=1; set schedule.virtual_stages=2"),
        (("interleaved-zb", 4, 8, 1), r"needs at least 2 virtual stages per rank"),
    ],
)
def test_build_schedule_errors_say_how_to_fix(args, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(*args)


def test_check_microbatches_messages():
    with pytest.raises(ConfigError) as err:
        check_microbatches("1f1b", 4, 2)
    assert str(err.value) == (
        "1F1B needs at least as many micro-batches as stages (got 2 for 4 stages); "
        "set schedule.microbatches>=4 or use gpipe"
    )
    with pytest.raises(ConfigError, match=r"interleaved 1F1B needs at least as many micro-batches as stages \(got 3 for 4"):
        check_microbatches("interleaved", 4, 3)
    with pytest.raises(ConfigError, match="need at least 1 micro-batch"):
        check_microbatches("gpipe", 4, 0)
    check_microbatches("gpipe", 4, 2)
    check_microbatches("1f1b", 4, 4)
    check_microbatches("interleaved", 4, 6)
    with pytest.raises(ConfigError, match=r"ZB-H1 needs at least as many micro-batches as stages \(got 3 for 4"):
        check_microbatches("zb-h1", 4, 3)
    with pytest.raises(ConfigError, match=r"ZB-V needs at least as many micro-batches as stages \(got 3 for 4"):
        check_microbatches("zb-v", 4, 3)


# --- broken schedules --------------------------------------------------------------------------


def test_cross_rank_deadlock_names_the_stuck_steps():
    # rank 0 runs B0 before F1, rank 1 runs F1 before B0: each waits for the other
    broken = _swap(_swap(schedule_1f1b(2, 4), 0, 1, 2), 1, 1, 2)
    with pytest.raises(ScheduleError) as err:
        simulate(broken)
    msg = str(err.value)
    assert msg.startswith("deadlock")
    assert "rank 0 stuck at step 1 (B0@0) waiting for B0@1, which rank 1 runs at step 2" in msg
    assert "rank 1 stuck at step 1 (F1@1) waiting for F1@0, which rank 0 runs at step 2" in msg


def test_backward_before_its_forward_on_same_rank_is_out_of_order():
    broken = _swap(schedule_1f1b(2, 4), 1, 0, 1)  # rank 1: B0@1 F0@1 ...
    with pytest.raises(ScheduleError, match=r"out-of-order dependency: rank 1 step 0 \(B0@1\) needs F0@1, .* at step 1"):
        simulate(broken)


def test_duplicate_action_rejected():
    s = schedule_gpipe(2, 2)
    broken = _replace_rank(s, 0, [str(a) for a in s.actions[0]] + ["F1@0"])
    with pytest.raises(ScheduleError, match=r"duplicate actions .*F1@0 at rank 0 step 1 and rank 0 step 4"):
        simulate(broken)


def test_missing_action_rejected():
    s = schedule_gpipe(2, 3)
    broken = _replace_rank(s, 1, [str(a) for a in s.actions[1] if str(a) != "B2@1"])
    with pytest.raises(ScheduleError, match=r"missing 1 action\(s\): B2@1; every micro-batch needs one F and one B"):
        simulate(broken)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("F0@1", r"rank 0 step 4 \(F0@1\): stage 1 lives on rank 1"),
        ("F5@0", "micro-batch 5 out of range"),
        ("F0@6", "stage 6 out of range"),
    ],
)
def test_misplaced_or_out_of_range_action_rejected(extra, match):
    s = schedule_gpipe(2, 2)
    broken = _replace_rank(s, 0, [str(a) for a in s.actions[0]] + [extra])
    with pytest.raises(ScheduleError, match=match):
        simulate(broken)


def test_schedule_shape_checked():
    with pytest.raises(ConfigError, match="action lists for 1 ranks but n_ranks=2"):
        Schedule(2, 1, 1, ((Action("F", 0, 0),),))
    with pytest.raises(ConfigError, match=r"stage_ranks=\[0, 0, 0, 1\] gives rank\(s\) \[0, 1\] other than 2 stage"):
        Schedule(2, 1, 2, ((), ()), stage_ranks=(0, 0, 0, 1))
    with pytest.raises(ConfigError, match=r"stage_ranks=\[0, 2\] must give a rank in 0..1 for each of the 2 stages"):
        Schedule(2, 1, 1, ((), ()), stage_ranks=(0, 2))


def test_v_placement_is_checked_against_the_actions():
    s = schedule_zb_v(2, 4)
    assert [s.rank_of(x) for x in range(4)] == [0, 1, 1, 0] and s.stages_of(0) == [0, 3]
    broken = _replace_rank(s, 1, [str(a) for a in s.actions[1]] + ["F0@3"])
    with pytest.raises(ScheduleError, match=r"rank 1 step \d+ \(F0@3\): stage 3 lives on rank 0"):
        simulate(broken)


# --- simulator details -------------------------------------------------------------------------


def test_comm_latency_and_per_stage_costs():
    # 2 stages, 1 micro-batch: F0, send, F1, B1, send, B0
    assert simulate(schedule_gpipe(2, 1), comm=0.5).makespan == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    assert simulate(schedule_gpipe(2, 1), cost_f=[1, 3], cost_b=[2, 6]).makespan == pytest.approx(12)
    with pytest.raises(ScheduleError, match="cost_f has 3 entries but the schedule has 2 stages"):
        simulate(schedule_gpipe(2, 1), cost_f=[1, 1, 1])


def test_split_backward_with_weight_grad_actions():
    base = schedule_1f1b(2, 4)
    rows = [[x for a in row for x in ([a, Action("W", a.microbatch, a.stage)] if a.kind == "B" else [a])] for row in base.actions]
    split = replace(base, actions=rows)
    result = simulate(split)
    assert result.peak_activations == simulate(base).peak_activations
    assert result.makespan < simulate(base).makespan  # B0 reaches rank 0 before W0 runs on rank 1
    early_w = _swap(split, 1, 1, 2)  # rank 1: F0@1 W0@1 B0@1
    with pytest.raises(ScheduleError, match=r"rank 1 step 1 \(W0@1\) needs B0@1"):
        simulate(early_w)


# --- files -------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    for s in (schedule_1f1b(3, 5), schedule_interleaved_1f1b(2, 4, 2), schedule_zb_v(3, 5)):
        path = tmp_path / f"{s.name}.json"
        save_schedule(s, path)
        assert load_schedule(path) == s
        assert json.loads(path.read_text())["actions"][0][0] == str(s.actions[0][0])


def test_load_accepts_space_separated_rows_and_defaults(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"n_microbatches": 1, "actions": ["F0@0 B0@0", "F0@1 B0@1"]}))
    s = load_schedule(path)
    assert (s.n_ranks, s.virtual_stages, s.name) == (2, 1, "mine")
    simulate(s)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ('{"actions": [["F0@0"]]}', 'must be a JSON object with "n_microbatches"'),
        ('{"n_microbatches": 1, "actions": [["F0@0", "Q0@0"]]}', r"rank 0: cannot read action 'Q0@0'"),
        ('{"n_ranks": 3, "n_microbatches": 1, "actions": [["F0@0"]]}', "action lists for 1 ranks but n_ranks=3"),
    ],
)
def test_load_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_schedule(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_schedule(tmp_path / "absent.json")


# --- timeline ----------------------------------------------------------------------------------


def test_timeline_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "t.png"
    argv = ["--schedule", "interleaved", "--ranks", "4", "--microbatches", "8", "--virtual", "2", "--out", str(out)]
    assert timeline_main(argv) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "bubble fraction 0.1579" in printed and "peak activations per rank [11, 9, 7, 5]" in printed
    assert timeline_main(["--schedule", "zb-v", "--ranks", "4", "--microbatches", "8", "--out", str(out)]) == 0
    assert "schedule zb-v: 4 ranks, 8 micro-batches, 2 virtual stage(s)" in capsys.readouterr().out


def test_draw_timeline_from_measured_seconds(tmp_path):
    measured = [
        [(Action("F", 0, 0), 1000.00, 1000.01), (Action("B", 0, 0), 1000.05, 1000.07)],
        [(Action("F", 0, 1), 1000.01, 1000.02), (Action("B", 0, 1), 1000.02, 1000.04)],
    ]
    path = draw_timeline(measured, tmp_path / "measured.png", title="measured", xlabel="seconds")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_timeline_cli_fails_on_broken_file(tmp_path):
    broken = _swap(_swap(schedule_1f1b(2, 4), 0, 1, 2), 1, 1, 2)
    path = tmp_path / "broken.json"
    save_schedule(broken, path)
    out = tmp_path / "never.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pp_runtime.training.timeline", "--file", str(path), "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode != 0
    assert "deadlock" in proc.stderr and "rank 0 stuck at step 1 (B0@0)" in proc.stderr
    assert not out.exists()
