"""Stage 0's step scheduler, as plain functions (no processes)."""

from __future__ import annotations

import pytest

from pp_runtime.errors import InputError
from pp_runtime.inference.batching import Request, SchedulerConfig, StepScheduler
from pp_runtime.inference.sampling import SamplingParams


def _requests(lengths, max_new=3):
    return [Request(i, f"r{i}", "", list(range(3, 3 + n)), max_new, SamplingParams()) for i, n in enumerate(lengths)]


def test_scheduler_budget_chunks_slots_and_continuous_batching():
    sched = StepScheduler(SchedulerConfig(n_slots=2, max_seqs=2, max_tokens=10, chunk_size=4),
                          iter(_requests([9, 3, 5])), eos_id=2)
    mb = sched.next_microbatch()  # two slots: requests 0 and 1 admitted, prefill chunks under the budget
    assert [(c.uid, c.start, len(c.tokens), c.sample) for c in mb.chunks] == [(0, 0, 4, False), (1, 0, 3, True)]
    assert sched.next_microbatch() is None  # both sequences are in flight: nothing else may run
    assert sched.complete(mb, [7, 8], [0.0, 0.0]) == []
    mb = sched.next_microbatch()  # decode first (request 1), then request 0's next prefill chunk
    assert [(c.uid, c.start, c.tokens, c.prefill) for c in mb.chunks] == [(1, 3, (8,), False), (0, 4, (7, 8, 9, 10), True)]
    sched.complete(mb, [2, 5], [0.0, 0.0])  # request 1 stops at EOS and frees its slot
    mb = sched.next_microbatch()
    uids = [c.uid for c in mb.chunks]
    assert uids == [0, 2] and mb.chunks[1].slot == 1  # request 2 takes the freed slot


def test_scheduler_finishes_on_length_and_reports_everything():
    sched = StepScheduler(SchedulerConfig(n_slots=1, max_seqs=1, max_tokens=8, chunk_size=8),
                          iter(_requests([2, 2], max_new=2)), eos_id=None)
    done = []
    while not sched.done:
        mb = sched.next_microbatch()
        if mb is None:  # the input's end is only known once admission finds no more requests
            continue
        done += sched.complete(mb, [9] * len(mb.chunks), [-0.5] * len(mb.chunks))
    assert [(c.request.uid, c.tokens, c.finish_reason) for c in done] == [(0, [9, 9], "length"), (1, [9, 9], "length")]


def test_scheduler_rejects_an_empty_prompt():
    sched = StepScheduler(SchedulerConfig(1, 1, 4, 4), iter([Request(0, "x", "", [], 3, SamplingParams())]), None)
    with pytest.raises(InputError, match="tokenises to nothing"):
        sched.next_microbatch()


def test_scheduler_spreads_the_last_sequences_over_the_micro_batches_in_flight():
    """6 slots, 3 micro-batches of up to 2: once all 4 requests are admitted and the input is dry,
    no micro-batch takes more than its even share, so every pipeline stage keeps work."""
    sched = StepScheduler(SchedulerConfig(n_slots=6, max_seqs=6, max_tokens=64, chunk_size=8, microbatches=3),
                          iter(_requests([2, 2, 2, 2])), eos_id=None)
    first, second = sched.next_microbatch(), sched.next_microbatch()
    assert [c.uid for c in first.chunks] == [0, 1] and [c.uid for c in second.chunks] == [2, 3]  # ceil(4 / 3)
    assert sched.next_microbatch() is None  # every sequence is in flight
    alone = StepScheduler(SchedulerConfig(n_slots=6, max_seqs=6, max_tokens=64, chunk_size=8),
                          iter(_requests([2, 2, 2, 2])), eos_id=None)
    assert len(alone.next_microbatch().chunks) == 4  # one micro-batch in flight: no reason to split


def test_ring_without_a_window_is_sized_from_free_memory():
    """Mixtral's shape on one 141 GB GPU holding half the model: the ring follows the budget (not the
    32k context), shrinks with more slots, and a budget that cannot hold it names the settings."""
    from pp_runtime.errors import ConfigError
    from pp_runtime.inference.engine import InferenceConfig
    from pp_runtime.inference.stage_runner import fit_cache_len
    from pp_runtime.model.args import preset

    args = preset("mixtral-8x7b")
    cfg = InferenceConfig().resolved(args, 2)
    assert cfg.cache_from_memory and cfg.cache_len == args.max_seq_len
    gib = 2**30
    few = fit_cache_len(100 * gib, 141 * gib, args, 16, 8, cfg, 2)
    many = fit_cache_len(100 * gib, 141 * gib, args, 16, 512, cfg, 2)
    per_position = 2 * 16 * 512 * args.n_kv_heads * args.head_dim * 2
    assert few == args.max_seq_len and 256 <= many < args.max_seq_len and many % 256 == 0
    assert many * per_position <= 141 * gib * 0.9 - 41 * gib  # inside the budget
    with pytest.raises(ConfigError, match="inference.gpu_memory_fraction"):
        fit_cache_len(20 * gib, 141 * gib, args, 16, 512, cfg, 2)
