"""The B / W split: postponed weight gradients equal autograd's, and no work is done twice."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.model.args import preset
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.partition import plan_for
from pp_runtime.model.split_linear import Linear, WeightGradQueue, enable_split_backward


def _model_and_batch(name: str, checkpointing: bool = False):
    args = preset(name, vocab_size=96)
    stage = ModelSource(args, None, seed=5).build_stage(plan_for(args, 1).stages[0], torch.float64, torch.device("cpu"))
    stage.activation_checkpointing = checkpointing
    stage.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab_size, (2 * 24,), generator=gen)
    # two rows, the first packing two documents
    meta = build_training_meta([[10, 14], [24]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    return stage, tokens, meta


def _loss(stage, tokens, meta) -> torch.Tensor:
    logits = stage(tokens, meta, logits="all")
    return torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])


def _grads(stage) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, checkpointing", [("tiny", False), ("tiny-moe", False), ("tiny", True)])
def test_postponed_weight_grads_equal_autograd(name, checkpointing):
    stage, tokens, meta = _model_and_batch(name, checkpointing)
    _loss(stage, tokens, meta).backward()
    expected = _grads(stage)
    stage.zero_grad(set_to_none=True)

    linears = enable_split_backward(stage)
    n_linear = len(linears)
    assert n_linear == sum(isinstance(m, Linear) for m in stage.modules()) > 0
    queue = WeightGradQueue()
    with queue.collecting(linears):
        _loss(stage, tokens, meta).backward()
    linear_weights = {f"{n}.weight" for n, m in stage.named_modules() if isinstance(m, Linear)}
    after_b = _grads(stage)
    assert not linear_weights & after_b.keys(), "B computed Linear weight gradients it should have postponed"
    assert set(after_b) == set(expected) - linear_weights  # norms and embedding: done in B
    assert len(queue) >= len(linear_weights)  # one per call (stacked experts are not Linears: done in B)
    queue.apply()
    assert len(queue) == 0
    got = _grads(stage)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_split_backward_does_the_matmuls_once():
    """FLOPs of B (postponing) + W equal one ordinary backward: nothing is recomputed."""
    stage, tokens, meta = _model_and_batch("tiny")
    loss = _loss(stage, tokens, meta)
    with FlopCounterMode(display=False) as plain:
        loss.backward()
    stage.zero_grad(set_to_none=True)

    linears = enable_split_backward(stage)
    loss = _loss(stage, tokens, meta)
    queue = WeightGradQueue()
    with FlopCounterMode(display=False) as b_only, queue.collecting(linears):
        loss.backward()
    with FlopCounterMode(display=False) as w_only:
        queue.apply()
    b, w, full = b_only.get_total_flops(), w_only.get_total_flops(), plain.get_total_flops()
    assert b + w == full
    assert 0.4 * full < w < 0.6 * full  # the weight half of the Linear backward matmuls


def test_unsplit_linear_is_plain_linear():
    """Without enable_split_backward (inference, schedules without W) the stock path runs."""
    lin = Linear(4, 3, bias=True).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    assert y.grad_fn is not None and "Split" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    # with a bias, once split: bias grad in B, weight grad in W
    linears = enable_split_backward(lin)
    ref = torch.nn.Linear(4, 3).double()
    ref.load_state_dict(lin.state_dict())
    ref(x).square().sum().backward()
    queue = WeightGradQueue()
    with queue.collecting(linears):
        lin(x).square().sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None
    queue.apply()
    # split-enabled but outside any queue (a schedule run by someone else): autograd's own result
    lin2 = Linear(4, 3, bias=True).double()
    lin2.load_state_dict(lin.state_dict())
    enable_split_backward(lin2)
    lin2(x).square().sum().backward()
    torch.testing.assert_close(lin2.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_place_weight_grads_accumulate_into_one_tensor(checkpointing):
    """Schedules without W actions: over two micro-batches each Linear's weight gradient equals
    autograd's, and the second micro-batch adds into the first's tensor (addmm_ into .grad, no new
    weight-sized tensor and no separate add)."""
    from pp_runtime.model.split_linear import InPlaceWeightGrads

    stage, tokens, meta = _model_and_batch("tiny", checkpointing)
    for _ in range(2):
        _loss(stage, tokens, meta).backward()
    expected = _grads(stage)
    stage.zero_grad(set_to_none=True)

    linears = enable_split_backward(stage)
    in_place = InPlaceWeightGrads()
    with in_place.collecting(linears):
        _loss(stage, tokens, meta).backward()
    first = {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}
    ptrs = {p.grad.data_ptr() for n, p in stage.named_parameters() if n in _linear_weights(stage)}
    with in_place.collecting(linears), _OpsOn(ptrs) as ops:
        _loss(stage, tokens, meta).backward()
    assert len(in_place) == 0  # nothing postponed
    assert ops.names and set(ops.names) == {"aten.addmm_.default"}, ops.names  # no add pass over .grad
    for n, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
        if n in _linear_weights(stage):
            assert p.grad is first[n], f"{n}: the second micro-batch made a new gradient tensor"


def _linear_weights(stage) -> set[str]:
    return {f"{n}.weight" for n, m in stage.named_modules() if isinstance(m, Linear)}


class _OpsOn(TorchDispatchMode):
    """Records the ops that read or write a tensor whose storage starts at one of `ptrs`."""

    def __init__(self, ptrs: set[int]) -> None:
        super().__init__()
        self.ptrs, self.names = ptrs, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(a, torch.Tensor) and a.data_ptr() in self.ptrs for a in args):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_autograd_accumulates_with_a_separate_add():
    """What the in-place path saves: plain autograd adds a second micro-batch's weight gradient into
    .grad with its own pass (the op recorder above does see it)."""
    stage, tokens, meta = _model_and_batch("tiny")
    _loss(stage, tokens, meta).backward()
    ptrs = {p.grad.data_ptr() for n, p in stage.named_parameters() if n in _linear_weights(stage)}
    with _OpsOn(ptrs) as ops:
        _loss(stage, tokens, meta).backward()
    assert "aten.add_.Tensor" in ops.names and "aten.addmm_.default" not in ops.names, ops.names
