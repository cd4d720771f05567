"""The on-device sampler against independent references: the published splitmix64 stream and
exact 64-bit Python arithmetic for its random bits, argmax for greedy rows, float64 log_softmax
for logprobs, and float64 filtered softmax distributions for the empirical token frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from pp_runtime.errors import ConfigError
from pp_runtime.inference.sampling import SamplingBatch, SamplingParams, random_bits, sample_tokens

CPU = torch.device("cpu")
MASK64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15


def _sample(logits, params, uids=None, positions=None, greedy_only=False, pad_to=None):
    n = len(params) if isinstance(params, list) else logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    batch = SamplingBatch.build(params, list(range(n)) if uids is None else uids,
                                [5] * n if positions is None else positions, CPU, pad_to=pad_to)
    return sample_tokens(logits, batch, greedy_only=greedy_only)


def _mix64_py(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_random_bits_follow_the_published_splitmix64_stream():
    """Seed 0, uid 0 is the stream seeded with 0, whose first outputs are splitmix64's reference values."""
    zeros = torch.zeros(3, dtype=torch.int64)
    got = [x & MASK64 for x in random_bits(zeros, zeros, torch.arange(3)).tolist()]
    assert got == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_random_bits_equal_exact_64_bit_arithmetic():
    rows = [(0, 0, 0), (7, 3, 11), (7, 3, 12), (-1, 2**62 + 5, 123456), (2**63 - 1, -(2**63), 1), (12345, 99, 2**40)]
    seed, uid, pos = (torch.tensor(col, dtype=torch.int64) for col in zip(*rows))
    expected = [_mix64_py((_mix64_py((s * GAMMA + u) & MASK64) + (p + 1) * GAMMA) & MASK64) for s, u, p in rows]
    assert [x & MASK64 for x in random_bits(seed, uid, pos).tolist()] == expected


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    for p in (SamplingParams(), SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=1e-30), SamplingParams(temperature=1e-45, seed=3)):
        tokens, _, finite = _sample(logits, p)
        assert torch.equal(tokens, best) and finite.all()
    assert torch.equal(_sample(logits, SamplingParams(), greedy_only=True)[0], best)
    mixed = [SamplingParams(temperature=5.0, seed=i) if i % 2 else SamplingParams() for i in range(6)]
    tokens = _sample(logits, mixed)[0]
    assert torch.equal(tokens[::2], best[::2])  # greedy rows of a mixed batch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_logprobs_are_the_models_unscaled_log_softmax(dtype):
    logits = (4 * torch.randn(5, 300, generator=torch.Generator().manual_seed(1))).to(dtype)
    tokens, lps, _ = _sample(logits, SamplingParams(temperature=0.7, top_k=40, seed=3))
    assert lps.dtype == torch.float32 and tokens.dtype == torch.int64
    ref = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lps.double(), ref, rtol=0, atol=1e-5)


def test_tokens_outside_top_k_and_top_p_never_appear():
    n = 3000
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(n, 1)
    tokens = _sample(logits, SamplingParams(temperature=5.0, top_k=3, seed=1))[0]
    assert set(tokens.tolist()) == {0, 1, 2}
    # softmax: 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two (mass before the 3rd is 0.88)
    tokens = _sample(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=1))[0]
    assert set(tokens.tolist()) == {0, 1}
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2))  # not in sorted order
    tokens = _sample(logits[:, perm], SamplingParams(temperature=3.0, top_k=4, top_p=0.5, seed=9))[0]
    assert set(perm[tokens].tolist()) == {0, 1}  # top-4 at T=3: 0.39, 0.28, 0.20, 0.14
    # top_p sees the top-k mass renormalised: 0.5, 0.3 -> 0.625, 0.375, so top_p=0.55 keeps one token
    three = torch.tensor([[0.2, 0.5, 0.3]]).log().repeat(n, 1)
    assert set(_sample(three, SamplingParams(temperature=1.0, top_k=2, top_p=0.55, seed=3))[0].tolist()) == {1}
    assert set(_sample(three, SamplingParams(temperature=1.0, top_p=0.55, seed=3))[0].tolist()) == {1, 2}
    ties = torch.tensor([[1.0, 3.0, 0.0, 3.0, 3.0, 2.0]]).repeat(n, 1)  # top_k cuts ties in token-id order
    assert set(_sample(ties, SamplingParams(temperature=1.0, top_k=2, seed=4))[0].tolist()) == {1, 3}


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """float64 reference: softmax(logits / T), top-k, renormalise, top-p prefix, renormalise."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    kept = order[: p.top_k] if p.top_k else order
    total = sum(probs[i].item() for i in kept)
    mass, final = 0.0, []
    for i in kept:
        if mass > p.top_p:
            break
        final.append(i)
        mass += probs[i].item() / total
    out = torch.zeros_like(probs)
    out[final] = probs[final] / probs[final].sum()
    return out


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = n * probs[support]
    return (((counts[support] - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.9), (2.0, 6, 0.8)])
def test_token_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p):
    """30000 draws over many (seed, uid, position): chi-square against the exact distribution stays
    below 50 (p < 1e-7 for <= 9 degrees of freedom), while 2T on the same tokens is far above it."""
    n = 30000
    logits = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.4, 0.0, -0.3, -0.7, -1.2, -2.0])
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    logits = logits[perm]
    params = [SamplingParams(temperature, top_p, top_k, seed=i % 5) for i in range(n)]
    uids = [i // 5 for i in range(n)]
    positions = [3 + (i * 7919) % 101 for i in range(n)]
    tokens = _sample(logits.repeat(n, 1), params, uids, positions)[0]
    counts = torch.bincount(tokens, minlength=10).double()
    right = _filtered_probs(logits, params[0])
    assert _chi_square(counts, right) < 50
    wrong = torch.softmax(logits.double() / (2 * temperature), -1) * (right > 0)  # same support, 2T
    assert _chi_square(counts, wrong / wrong.sum()) > 300


def test_draws_depend_on_seed_uid_and_position_only():
    gen = torch.Generator().manual_seed(5)
    n = 12
    logits = torch.randn(n, 200, generator=gen).double()
    params = [SamplingParams(temperature=0.5 + 0.25 * (i % 4), top_p=(1.0, 0.95, 0.7)[i % 3], top_k=(0, 50)[i % 2],
                             seed=100 + i % 3) for i in range(n)]
    uids, positions = [1000 + i for i in range(n)], [17 + 3 * i for i in range(n)]
    alone = torch.cat([_sample(logits[i:i + 1], [params[i]], [uids[i]], [positions[i]])[0] for i in range(n)])
    # shuffled, mixed with other requests, then padded
    order = torch.randperm(n, generator=gen).tolist()
    others = torch.randn(5, 200, generator=gen).double()
    big_logits = torch.cat([logits[order], others, torch.zeros(3, 200, dtype=torch.float64)])
    big_params = [params[i] for i in order] + [SamplingParams(temperature=1.0, seed=i) for i in range(5)]
    big = _sample(big_logits, big_params, [uids[i] for i in order] + list(range(5)),
                  [positions[i] for i in order] + [9] * 5, pad_to=n + 8)[0]
    assert torch.equal(big[:n], alone[order])
    # and each of seed, uid and position changes the draws (uniform logits: pure randomness)
    flat = torch.zeros(64, 1000)
    base = SamplingParams(temperature=1.0, seed=7)
    a = _sample(flat, base)[0]
    assert not torch.equal(a, _sample(flat, SamplingParams(temperature=1.0, seed=8))[0])
    assert not torch.equal(a, _sample(flat, base, uids=list(range(1, 65)))[0])
    assert not torch.equal(a, _sample(flat, base, positions=[6] * 64)[0])


@pytest.mark.parametrize("greedy_only", [True, False])
def test_non_finite_rows_are_flagged_and_isolated(greedy_only):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(6))
    params = SamplingParams() if greedy_only else SamplingParams(temperature=1.0, top_p=0.9, seed=2)
    clean_ids, clean_lps, _ = _sample(logits, params, greedy_only=greedy_only)
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[3, :] = float("nan")
    bad[4, 0] = float("inf")
    ids, lps, finite = _sample(bad, params, greedy_only=greedy_only)
    assert finite.tolist() == [True, False, True, False, False, True]
    assert ids[~finite].tolist() == [0, 0, 0]
    good = finite.nonzero()[:, 0]
    assert torch.equal(ids[good], clean_ids[good]) and torch.equal(lps[good], clean_lps[good])


def test_fill_rewrites_the_same_buffers():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    batch = SamplingBatch.build([SamplingParams()] * 4, [0, 1, 2, 3], [1, 1, 1, 1], CPU)
    pointers = [t.data_ptr() for t in (batch.temperature, batch.top_p, batch.top_k, batch.seed, batch.uid,
                                       batch.position)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=10, seed=4), SamplingParams(temperature=2.0, seed=5)]
    batch.fill_(params, [11, 12], [30, 31])
    assert pointers == [t.data_ptr() for t in (batch.temperature, batch.top_p, batch.top_k, batch.seed,
                                               batch.uid, batch.position)]
    fresh = SamplingBatch.build(params, [11, 12], [30, 31], CPU, pad_to=4)
    assert fresh.temperature.tolist()[2:] == [0.0, 0.0] and fresh.top_p.tolist()[2:] == [1.0, 1.0]  # greedy padding
    for a, b in zip(sample_tokens(logits, batch, greedy_only=False), sample_tokens(logits, fresh, greedy_only=False)):
        assert torch.equal(a, b)
    assert batch.temperature.tolist() == pytest.approx([0.8, 2.0, 0.0, 0.0]) and batch.uid.tolist() == [11, 12, 0, 0]


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_p=-math.inf), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k="many"), "top_k"), (dict(seed=2**64), "seed"), (dict(seed=None), "seed"),
])
def test_bad_sampling_settings_name_the_key(kwargs, field):
    with pytest.raises(ConfigError, match=f"sampling.{field}="):
        SamplingParams(**kwargs)
    with pytest.raises(ConfigError, match=f"request 'r1'.{field}="):
        SamplingParams.parse(**kwargs, where="request 'r1'")


def test_parse_converts_config_strings():
    assert SamplingParams.parse("0.5", "0.9", "40", "7") == SamplingParams(0.5, 0.9, 40, 7)
    assert SamplingParams.parse(1, 1, 3.0, 2**63 - 1) == SamplingParams(1.0, 1.0, 3, 2**63 - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_replays_as_a_graph():
    gen = torch.Generator().manual_seed(9)
    n, vocab = 16, 32000
    logits = 3 * torch.randn(n, vocab, generator=gen)
    params = [SamplingParams(temperature=0.6 + 0.1 * i, top_p=(1.0, 0.9)[i % 2], top_k=(0, 50)[i % 3 == 0], seed=i)
              for i in range(n)]
    uids, positions = list(range(n)), [40 + i for i in range(n)]
    cpu = _sample(logits, params, uids, positions)[0]
    dev = torch.device("cuda")
    key = [torch.tensor(c, dtype=torch.int64) for c in ([p.seed for p in params], uids, positions)]
    assert torch.equal(random_bits(*key), random_bits(*(k.to(dev) for k in key)).cpu())
    batch = SamplingBatch.build(params, uids, positions, dev)
    static_logits = logits.to(dev)
    sample_tokens(static_logits, batch, greedy_only=False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_tokens(static_logits, batch, greedy_only=False)
    graph.replay()
    assert torch.equal(out[0].cpu(), cpu)
    shifted = [p + 1 for p in positions]  # next step: new positions, same buffers
    batch.fill_(params, uids, shifted)
    graph.replay()
    assert torch.equal(out[0].cpu(), _sample(logits, params, uids, shifted)[0])
