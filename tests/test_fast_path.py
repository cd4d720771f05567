"""The fast generation path (fused kernels, varlen ring attention, bucketed padded steps) against the
reference path (the module as written, SDPA with a dense mask), on CPU under Triton's interpreter.

The processes are spawned with TRITON_INTERPRET=1 in their environment, so the kernels are defined
for the interpreter there, and the variable never leaks into this pytest process. CUDA graph
replay itself needs a GPU: benchmarks/bench_infer.py checks graph == eager tokens there.
"""

from __future__ import annotations

import random

import pytest
import torch

from dist_utils import run_ranks
from pp_runtime.inference.batching import Request
from pp_runtime.inference.sampling import SamplingParams

MAX_NEW = 6


def _requests(vocab: int, window: int, n: int = 5) -> list[Request]:
    rng = random.Random(3)
    out = []
    for uid in range(n):
        length = rng.randint(1, 3 * window)  # unequal, some several windows long: the ring wraps
        sampling = SamplingParams() if uid % 2 else SamplingParams(temperature=0.8, top_k=20, seed=5)
        out.append(Request(uid, uid, "", [rng.randrange(3, vocab) for _ in range(length)], MAX_NEW, sampling))
    return out


def _generate(rank: int, world: int, ckpt: str, attention: str, spare_slots: int) -> dict:
    """Rank 0 returns tokens, logprobs and reasons; every rank the cache entries of slots no sequence used."""
    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.distributed.parallel import init_parallel
    from pp_runtime.inference.engine import InferenceConfig, StageRunner, run_pipeline
    from pp_runtime.model.partition import plan_for

    ctx = init_parallel(device="cpu")
    source = ModelSource.from_path(ckpt)
    args = source.args
    module = source.build_stage(plan_for(args, world).stages[rank], torch.float32, ctx.device)
    reqs = _requests(args.vocab_size, args.sliding_window)
    cfg = InferenceConfig(microbatches=world, batch_size=2 + spare_slots, max_batch_tokens=24,
                          attention=attention).resolved(args, world)
    runner = StageRunner(args, module, cfg, ctx.device, torch.float32)
    comps, _ = run_pipeline(ctx, runner, iter(reqs) if ctx.is_first else None, eos_id=None)
    n_slots = cfg.microbatches * cfg.batch_size  # handed out from 0 upwards: with spare slots the last stay free
    free = list(range(min(n_slots, len(reqs)), runner.cache.n_slots))
    untouched = all(bool((runner.cache.k[:, s] == 0).all() and (runner.cache.v[:, s] == 0).all()) for s in free)
    return {"runs": {c.request.uid: (c.tokens, c.logprobs, c.finish_reason) for c in comps},
            "free_slots": free, "free_untouched": untouched, "fast": runner.fast is not None}


@pytest.mark.parametrize("world, model", [(1, "tiny"), (2, "tiny"), (1, "tiny-moe")])
def test_fast_path_equals_reference_path(world, model, tiny_ckpt, tiny_moe_ckpt, monkeypatch):
    """Same tokens and finish reasons, logprobs within float32 rounding, for mixed prefill/decode steps
    padded to token buckets; slots no sequence owns (and the scratch slot padding rows point at)
    stay untouched."""
    ckpt = str(tiny_ckpt if model == "tiny" else tiny_moe_ckpt)
    reference = run_ranks(1, _generate, ckpt, "sdpa", 0)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ranks = run_ranks(world, _generate, ckpt, "triton", 3, timeout=600)
    assert all(r["fast"] for r in ranks)
    fast = ranks[0]["runs"]
    assert sorted(fast) == sorted(reference["runs"])
    for uid, (tokens, logprobs, reason) in reference["runs"].items():
        assert fast[uid][0] == tokens, f"request {uid} diverged on the fast path ({world} stage(s))"
        assert fast[uid][2] == reason
        torch.testing.assert_close(torch.tensor(fast[uid][1]), torch.tensor(logprobs), rtol=0, atol=2e-4)
    for r in ranks:
        assert r["free_slots"] and r["free_untouched"]
