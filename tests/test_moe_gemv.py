"""The routed-experts decode kernels (Triton interpreter on CPU) against a per-(token, choice) float64
reference and the grouped path's "loop" backend.

Every expert no real token was routed to has NaN weights, and padding rows have NaN inputs, so a
kernel that reads an unrouted expert or lets a padding row into a real one fails the comparison.
"""

from __future__ import annotations

import os

# Read when Triton's own library and our kernels are defined, so it must be set before triton is
# first imported in this process; kernels then run on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language.standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from pp_runtime.model.args import preset  # noqa: E402
from pp_runtime.model.moe import GEMV_MAX_TOKENS, MoeFeedForward, experts_forward, pick_backend, uses_gemv  # noqa: E402
from pp_runtime.model import moe_gemv as mg  # noqa: E402

DIM, HIDDEN, K = 64, 96, 2
SMALL = mg.GemvBlocks(block_h=32, block_d=32, block_n=16, block_k=64)  # several tiles; hidden 96 = 64 + a masked 32
WIDE = mg.GemvBlocks(block_h=64, block_d=128, block_n=32, block_k=128)  # tiles wider than dim and hidden: masked


def test_kernels_run_in_the_interpreter():
    """Guards the switch above: had triton been imported earlier in this process, kernels would need a GPU."""
    for fn in (triton.language.standard.zeros, mg._routed_w13_kernel, mg._routed_w2_kernel):
        assert isinstance(fn, InterpretedFunction), "set TRITON_INTERPRET=1 before triton is first imported"


def _weights(n_experts: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(n_experts, HIDDEN, DIM, generator=g) * DIM**-0.5 for _ in range(2))
    w2 = torch.randn(n_experts, DIM, HIDDEN, generator=g) * HIDDEN**-0.5
    return w1.to(dtype), w2.to(dtype), w3.to(dtype)


def _routing(t: int, n_experts: int, seed: int, pattern: str = "random"):
    """[T, k] distinct experts per token (as top-k gives) and softmax weights."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        experts = torch.stack([torch.randperm(n_experts, generator=g)[:K] for _ in range(t)])
    elif pattern == "shared":  # every token on the same two experts, in either order
        experts = torch.tensor([[3, 1] if i % 2 else [1, 3] for i in range(t)])
    else:
        raise ValueError(pattern)
    weights = torch.softmax(torch.randn(t, K, generator=g), -1)
    return experts, weights


def _poison_unrouted(ws, experts: torch.Tensor, n_real: int):
    """NaN weights for every expert no real token chose: reading one shows in the output."""
    used = set(experts[:n_real].reshape(-1).tolist())
    out = []
    for w in ws:
        w = w.clone()
        for e in range(w.shape[0]):
            if e not in used:
                w[e] = float("nan")
        out.append(w)
    return out


def reference(x, experts, weights, w1, w2, w3, n_real=None, round_h=None):
    """Per (token, choice), float64 from the definition; `round_h` rounds h as the kernel stores it."""
    n_real = x.shape[0] if n_real is None else n_real
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(n_real):
        xt = x[t].double()
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            h = F.silu(w1[e].double() @ xt) * (w3[e].double() @ xt)
            if round_h is not None:
                h = h.to(round_h).double()
            out[t] += weights[t, j].double() * (w2[e].double() @ h)
    return out


@dataclass(frozen=True)
class Case:
    n_experts: int
    tokens: int
    blocks: mg.GemvBlocks
    pattern: str = "random"


CASES = {
    "E=8 T=1": Case(8, 1, mg.DEFAULT_BLOCKS),
    "E=8 T=3 small tiles": Case(8, 3, SMALL),
    "E=8 T=5 wide tiles": Case(8, 5, WIDE),
    "E=4 T=5 shared experts": Case(4, 5, SMALL),  # 10 pairs on 4 experts: tokens share experts
    "E=8 T=4 all on two experts": Case(8, 4, mg.DEFAULT_BLOCKS, "shared"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name):
    c = CASES[name]
    experts, weights = _routing(c.tokens, c.n_experts, seed=len(name))
    w1, w2, w3 = _poison_unrouted(_weights(c.n_experts, torch.float32), experts, c.tokens)
    x = torch.randn(c.tokens, DIM, generator=torch.Generator().manual_seed(7))
    got = mg.routed_experts_forward(x, experts, weights, w1, w2, w3, blocks=c.blocks)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), reference(x, experts, weights, w1, w2, w3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    """One rounding of h and one of the output: within an ulp or two of the float64 reference that
    rounds h the same way (bf16 tiles are widened before tl.dot in the interpreter, fp16 go as they are)."""
    t, n_experts = 5, 8
    experts, weights = _routing(t, n_experts, seed=11)
    w1, w2, w3 = _poison_unrouted(_weights(n_experts, dtype, seed=1), experts, t)
    x = torch.randn(t, DIM, generator=torch.Generator().manual_seed(3)).to(dtype)
    weights = weights.to(dtype)
    got = mg.routed_experts_forward(x, experts, weights, w1, w2, w3)
    assert got.dtype == dtype
    ref = reference(x, experts, weights, w1, w2, w3, round_h=dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref, rtol=2 * eps, atol=2 * eps * float(ref.abs().max()))


@pytest.mark.parametrize("as_tensor", [True, False])
def test_padding_rows_are_routed_nowhere(as_tensor):
    """With 2 real tokens of 5, the padding rows (NaN inputs, routed to experts nobody real chose,
    whose weights are NaN) give zeros and leave the real rows exact."""
    t, n_real, n_experts = 5, 2, 8
    experts = torch.tensor([[0, 1], [1, 2], [5, 6], [7, 5], [6, 7]])
    weights = torch.softmax(torch.randn(t, K, generator=torch.Generator().manual_seed(2)), -1)
    w1, w2, w3 = _poison_unrouted(_weights(n_experts, torch.float32, seed=4), experts, n_real)
    x = torch.randn(t, DIM, generator=torch.Generator().manual_seed(5))
    x[n_real:] = float("nan")
    valid = torch.tensor(n_real, dtype=torch.int32) if as_tensor else n_real
    got = mg.routed_experts_forward(x, experts, weights, w1, w2, w3, valid)
    assert torch.equal(got[n_real:], torch.zeros(t - n_real, DIM))
    torch.testing.assert_close(got.double(), reference(x, experts, weights, w1, w2, w3, n_real=n_real),
                               rtol=1e-5, atol=1e-5)


def _layer(dtype: torch.dtype) -> MoeFeedForward:
    torch.manual_seed(0)
    m = MoeFeedForward(preset("tiny-moe")).to(dtype)  # dim 64, hidden 96, 8 experts, top-2
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("dtype,t", [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 3)])
def test_experts_forward_gemv_equals_loop_backend(dtype, t):
    m = _layer(dtype)
    x = torch.randn(t, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(t)).to(dtype)
    with torch.no_grad():
        top, experts = torch.topk(m.gate(x), m.top_k, dim=-1)
        weights = torch.softmax(top.float(), -1).to(dtype)
        e = m.experts
        got = experts_forward(x, experts, weights, e.w1, e.w2, e.w3, "gemv")
        ref = experts_forward(x, experts, weights, e.w1, e.w2, e.w3, "loop")
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # the loop rounds each matmul, the product and each weighted term to bf16; the kernels only h and out
        scale = float(ref.float().abs().max())
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


class _FakeCuda:
    """Just what `uses_gemv` reads of a tensor: a CUDA tensor's attributes without a GPU."""

    is_cuda = True

    def __init__(self, t: int, dtype: torch.dtype = torch.bfloat16, stride: int = 1) -> None:
        self.shape, self.dtype, self._stride = (t, DIM), dtype, stride

    def dim(self) -> int:
        return 2

    def stride(self, i: int) -> int:
        return self._stride


def test_gemv_is_picked_at_decode_sizes_for_inference_only():
    assert uses_gemv(_FakeCuda(1)) and uses_gemv(_FakeCuda(GEMV_MAX_TOKENS))
    assert uses_gemv(_FakeCuda(4, torch.float16))
    assert not uses_gemv(_FakeCuda(GEMV_MAX_TOKENS + 1))  # prefill and large batches: grouped_mm
    assert not uses_gemv(_FakeCuda(1), needs_grad=True)  # no backward
    assert not uses_gemv(_FakeCuda(1, torch.float32))
    assert not uses_gemv(_FakeCuda(1, stride=2))
    assert pick_backend(torch.zeros(1, DIM, dtype=torch.bfloat16), 96) == "loop"  # CPU keeps the exact loop


def test_too_many_tokens_and_bad_weights_are_refused():
    w1, w2, w3 = _weights(4, torch.float32)
    t = mg.MAX_KERNEL_TOKENS + 1
    experts, weights = torch.zeros(t, K, dtype=torch.long), torch.zeros(t, K)
    with pytest.raises(ValueError, match="grouped_mm"):
        mg.routed_experts_forward(torch.zeros(t, DIM), experts, weights, w1, w2, w3)
    with pytest.raises(ValueError, match="contiguous"):
        mg.routed_experts_forward(torch.zeros(1, DIM), experts[:1], weights[:1], w1, w2.transpose(1, 2).contiguous()
                                  .transpose(1, 2), w3)
