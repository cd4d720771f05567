"""Sampling rules and stage 0's step scheduler, as plain functions (no processes)."""

from __future__ import annotations

import pytest
import torch

from pp_runtime.errors import ConfigError, InputError
from pp_runtime.sampling import Sampler, SamplingParams
from pp_runtime.scheduler import Request, SchedulerConfig, StepScheduler


def _sample(logits, params, uids=None, positions=None):
    n = logits.shape[0]
    return Sampler(torch.device("cpu")).sample(logits, uids or list(range(n)), positions or [5] * n, [params] * n)


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    for p in (SamplingParams(), SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        tokens, _ = _sample(logits, p)
        assert torch.equal(tokens, best)


def test_logprobs_are_the_models_log_softmax():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    tokens, lps = _sample(logits, SamplingParams(temperature=0.7, seed=3))
    torch.testing.assert_close(lps, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    tokens, _ = _sample(logits, SamplingParams(temperature=5.0, top_k=3, seed=1), uids=list(range(400)))
    assert set(tokens.tolist()) == {0, 1, 2}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    tokens, _ = _sample(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=1), uids=list(range(400)))
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.08  # renormalised over the kept tokens


def test_random_stream_depends_on_seed_request_and_position_only():
    logits = torch.zeros(64, 1000)  # uniform: every draw is pure randomness
    p = SamplingParams(temperature=1.0, seed=7)
    a, _ = _sample(logits, p, uids=list(range(64)))
    b, _ = _sample(logits.flip(0), p, uids=list(range(64)))  # other batch order, same requests
    assert torch.equal(a, b)
    c, _ = _sample(logits, SamplingParams(temperature=1.0, seed=8), uids=list(range(64)))
    d, _ = _sample(logits, p, uids=list(range(64)), positions=[6] * 64)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_settings_name_the_key(kwargs):
    with pytest.raises(ConfigError, match="sampling." + next(iter(kwargs))):
        SamplingParams(**kwargs)


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
