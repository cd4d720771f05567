"""Weight gradients that can wait: the B / W split of zero-bubble schedules.

The previous stage waits only for the input gradient; the weight gradients (about half of the
backward's FLOPs) can run later, in what would otherwise be pipeline bubble. `Linear` is
`nn.Linear` that, once `enable_split_backward` marks it, records (input, output gradient) in the
`WeightGradQueue` collecting during a backward instead of computing its weight gradient there.
`WeightGradQueue.apply` later does exactly those matmuls, with no second pass through autograd.
Norm weights, the embedding and biases get their (cheap) gradients in the backward itself, and
so do MoE expert weights (stacked [E, out, in] parameters of grouped matmuls, not Linears).

Either way a weight gradient is added into `.grad` by its own matmul (`addmm_`, beta = 1), not
computed into a new tensor that autograd then adds with a second pass over the weight-sized
gradient: on 2 H200s at the Mistral-7B shape that pass cost 3-4% of a training step. Schedules
without W actions get the same through `InPlaceWeightGrads`, which does the matmul at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradQueue:
    """Weight-gradient matmuls postponed by one backward, applied later with `apply`."""

    def __init__(self) -> None:
        self._pending: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def put(self, weight: nn.Parameter, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self._pending.append((weight, x, grad_out))

    def __len__(self) -> int:
        return len(self._pending)

    @contextmanager
    def collecting(self, linears: Sequence["Linear"]) -> Iterator["WeightGradQueue"]:
        """While inside, backwards through these split-enabled Linears defer to this queue."""
        for lin in linears:
            lin.weight_grad_queue = self
        try:
            yield self
        finally:
            for lin in linears:
                lin.weight_grad_queue = None

    @torch.no_grad()
    def apply(self) -> None:
        """Accumulate every postponed weight gradient into `.grad`, as autograd would have."""
        for weight, x, grad_out in self._pending:
            accumulate_weight_grad(weight, x, grad_out)
        self._pending.clear()


class InPlaceWeightGrads(WeightGradQueue):
    """Postpones nothing: each weight gradient is accumulated into `.grad` during the backward."""

    def put(self, weight: nn.Parameter, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        with torch.no_grad():
            accumulate_weight_grad(weight, x, grad_out)


def accumulate_weight_grad(weight: nn.Parameter, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """weight.grad += d(loss)/d(weight); the first one is a new tensor."""
    if weight.grad is None:
        weight.grad = _weight_grad(x, grad_out).to(weight.dtype)
    elif weight.grad.dtype == x.dtype == grad_out.dtype:
        weight.grad.addmm_(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
    else:
        weight.grad.add_(_weight_grad(x, grad_out).to(weight.dtype))


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of y = x @ weight.T over all leading dimensions: grad_out.T @ x."""
    return grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


class _SplitLinearFn(torch.autograd.Function):
    """y = x @ weight.T (+ bias) whose weight gradient goes to the owner's queue when one is set."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], owner: "Linear"):
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.has_bias = owner, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            queue = ctx.owner.weight_grad_queue
            if queue is None:
                grad_w = _weight_grad(x, grad_out)
            else:
                # the module's Parameter, not the saved tensor: under activation checkpointing the
                # saved one is a recomputed alias whose .grad nobody reads
                queue.put(ctx.owner.weight, x, grad_out)
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose weight gradient can be postponed.

    Until `enable_split_backward` marks it (the training executor does, for every stage), it is
    plain `F.linear`, so inference runs exactly the stock code; so is a frozen one (LoRA's base
    weights): it has no weight gradient to postpone and need not keep its input."""

    split_backward: bool = False
    weight_grad_queue: Optional[WeightGradQueue] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_backward and torch.is_grad_enabled() and self.weight.requires_grad:
            return _SplitLinearFn.apply(x, self.weight, self.bias, self)
        return F.linear(x, self.weight, self.bias)


def enable_split_backward(module: nn.Module) -> list[Linear]:
    """Route `module`'s Linears through the splittable path; returns them, for `collecting`."""
    linears = [m for m in module.modules() if isinstance(m, Linear)]
    for lin in linears:
        lin.split_backward = True
    return linears
