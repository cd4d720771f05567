"""Routed-experts decode path: Mixtral's expert FFN at a few tokens, reading only the routed experts.

At decode a MoE layer sees a handful of tokens, and the expert matmuls are pure weight streaming:
the time is the bytes of expert weights read. `torch._grouped_mm` (the "grouped_mm" backend) reads
all E experts' weights whatever the routing, so at one token (top-2 of 8) it reads 4x what the
token needs. The two kernels here read only the experts some real token was routed to:

1. `_routed_w13_kernel`, grid (cdiv(hidden, BLOCK_H), min(E, T*k)): program (i, u) finds the u-th
   routed expert e (ids sorted; a program whose u is past the number of distinct routed experts
   does nothing), streams rows [i*BLOCK_H, (i+1)*BLOCK_H) of w1[e] and w3[e] in [BLOCK_H, BLOCK_D]
   bf16 tiles along dim, multiplies them with every token routed to e at once (one tile read
   serves all of them; fp32 accumulation) and stores h = silu(w1 x) * w3 x, rounded once to the
   input dtype, at the pair's row t*k + j of h [T*k, hidden].
2. `_routed_w2_kernel`, grid (cdiv(dim, BLOCK_N),): program i loops over the experts, skips those
   no real token chose, streams rows [i*BLOCK_N, (i+1)*BLOCK_N) of w2[e] against the h rows of the
   pairs routed to e, and adds y * routing weight per token in fp32 registers, so the weighted sum
   over a token's k choices happens in the kernel, in a fixed order (no atomics; deterministic),
   and is rounded once when stored to out [T, dim].

Bytes per layer: |routed experts| x 3 x dim x hidden x 2 B (bf16); activations and h are noise.
Mixtral 8x7B (dim 4096, hidden 14336, top-2 of 8): one expert is 3 x 4096 x 14336 x 2 B = 352 MB,
so one token reads 2 experts = 705 MB per layer. At ~4.3 TB/s of achievable HBM bandwidth (H200;
~3 TB/s on H100) that is a floor of ~0.16 ms per layer (~0.23 ms on H100), against ~0.58 ms
measured for grouped_mm at T=1, which streams all 8 experts (2.8 GB). With T tokens routed at random
the expected number of distinct experts is E (1 - (1 - k/E)^T): 2, 3.5, 5.5, 7.2, 7.9 for T = 1, 2,
4, 8, 16, so the saving shrinks with T and is gone by T = 16; past that grouped_mm's tensor-core
GEMM is the better kernel (see `moe.GEMV_MAX_TOKENS`). Padding rows of a fixed-shape step
(`valid_tokens`) are routed nowhere: the fast path's smallest bucket is 16 rows, and at batch 1
only its one real token decides which experts are read.

Launch grids and allocations depend only on shapes; expert ids, routing weights and the valid-token
count are read inside the kernels from device tensors, so a step can be captured in a CUDA graph
(after one warm-up call compiles the kernels). Block sizes are fixed (`GemvBlocks`, no autotuning,
which cannot run inside a capture): [64, 128] bf16 tiles of w1 and w3 (16 KB each) per step of
kernel 1 and [32, 256] tiles of w2 in kernel 2, 4 warps, 3 pipeline stages: with T=1 and 2 routed
experts, kernel 1 runs 2 x 224 programs of 1 MB each and kernel 2 128 programs of 1.8 MB, enough
loads in flight to saturate HBM on H100 / H200. The token tile is at least 16 rows (tl.dot's
minimum): rows of tokens not routed to a program's expert are masked to zero and never loaded.

Inference only (no backward). Under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1), bfloat16
tiles are widened to float32 before tl.dot, since the interpreter multiplies bfloat16 as raw bits
(Triton 3.9); products of bf16 values are exact in fp32, so this is the GPU's arithmetic too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_KERNEL_TOKENS = 64  # token tile up to 64 rows (registers: two [BLOCK_H, 64] fp32 accumulators)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemvBlocks:
    """Fixed tile sizes (powers of two >= 16): w1/w3 rows x dim columns per step of kernel 1,
    w2 rows x hidden columns per step of kernel 2."""

    block_h: int = 64
    block_d: int = 128
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_h", "block_d", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")


DEFAULT_BLOCKS = GemvBlocks()


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _n_valid(valid_ptr, n_real, n_tokens, HAS_VALID: tl.constexpr):
    """Real tokens (the leading rows): min(*valid_ptr, n_tokens) with a device count, else n_real."""
    if HAS_VALID:
        n = tl.minimum(tl.maximum(tl.load(valid_ptr).to(tl.int32), 0), n_tokens)
    else:
        n = n_real + tl.zeros([], tl.int32)
    return n


@triton.jit
def _routed_expert(experts_ptr, n_pairs, u, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """The u-th (by id) distinct expert among the first `n_pairs` flat expert ids, and whether there is one."""
    p = tl.arange(0, BLOCK_P)
    ids = tl.load(experts_ptr + p, mask=p < n_pairs, other=-1).to(tl.int32)
    ev = tl.arange(0, E_PAD)
    present = tl.max((ids[None, :] == ev[:, None]).to(tl.int32), axis=1)  # [E_PAD]
    rank = tl.cumsum(present, 0) - 1
    sel = (present > 0) & (rank == u)
    e = tl.sum(tl.where(sel, ev, 0), 0)
    found = tl.sum(sel.to(tl.int32), 0) > 0
    return e, found


@triton.jit
def _slot_of(experts_ptr, tok, n_valid, e, TOP_K: tl.constexpr):
    """For each token of `tok`: which of its k choices is expert e (-1: none, or not a real token)."""
    slot = tl.full(tok.shape, -1, tl.int32)
    for j in tl.static_range(TOP_K):
        ej = tl.load(experts_ptr + tok * TOP_K + j, mask=tok < n_valid, other=-1).to(tl.int32)
        slot = tl.where(ej == e, j, slot)
    return slot


@triton.jit
def _routed_w13_kernel(
    x_ptr, experts_ptr, valid_ptr, w1_ptr, w3_ptr, h_ptr,
    n_real, n_tokens, dim, hidden, x_stride,
    TOP_K: tl.constexpr, HAS_VALID: tl.constexpr, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[t*k + j, rows] = silu(w1[e, rows] x_t) * (w3[e, rows] x_t) for the tokens t routed to the
    program's expert e (their choice j); fp32 accumulation, one rounding."""
    pid_h = tl.program_id(0)
    u = tl.program_id(1)
    n_valid = _n_valid(valid_ptr, n_real, n_tokens, HAS_VALID)
    e, found = _routed_expert(experts_ptr, n_valid * TOP_K, u, E_PAD, BLOCK_P)
    if found:
        tok = tl.arange(0, BLOCK_T)
        slot = _slot_of(experts_ptr, tok, n_valid, e, TOP_K)
        hit = slot >= 0
        rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < hidden
        w_rows = (e.to(tl.int64) * hidden + rows)[:, None] * dim  # [BLOCK_H, 1] (int64)
        x_rows = tok.to(tl.int64)[None, :] * x_stride  # [1, BLOCK_T]
        acc1 = tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + cols
            if EVEN_D:
                w_mask = row_ok[:, None]
                x_mask = hit[None, :]
            else:
                w_mask = row_ok[:, None] & (d < dim)[None, :]
                x_mask = hit[None, :] & (d < dim)[:, None]
            xt = tl.load(x_ptr + x_rows + d[:, None], mask=x_mask, other=0.0)  # [BLOCK_D, BLOCK_T]
            a1 = tl.load(w1_ptr + w_rows + d[None, :], mask=w_mask, other=0.0)  # [BLOCK_H, BLOCK_D]
            a3 = tl.load(w3_ptr + w_rows + d[None, :], mask=w_mask, other=0.0)
            if UPCAST:
                xt, a1, a3 = xt.to(tl.float32), a1.to(tl.float32), a3.to(tl.float32)
            acc1 = tl.dot(a1, xt, acc1, input_precision=DOT_PRECISION)
            acc3 = tl.dot(a3, xt, acc3, input_precision=DOT_PRECISION)
        h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
        pair = tok.to(tl.int64) * TOP_K + slot
        tl.store(h_ptr + pair[None, :] * hidden + rows[:, None], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & hit[None, :])


@triton.jit
def _routed_w2_kernel(
    h_ptr, experts_ptr, weights_ptr, valid_ptr, w2_ptr, out_ptr,
    n_real, n_tokens, dim, hidden, out_stride,
    N_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[t, rows] = sum_j weights[t, j] * (w2[e_tj, rows] h[t*k + j]) over real tokens t, in fp32,
    experts in id order; rows of padding tokens get zeros."""
    pid_n = tl.program_id(0)
    n_valid = _n_valid(valid_ptr, n_real, n_tokens, HAS_VALID)
    tok = tl.arange(0, BLOCK_T)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < dim
    cols = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    for e in range(N_EXPERTS):
        slot = _slot_of(experts_ptr, tok, n_valid, e, TOP_K)
        hit = slot >= 0
        if tl.max(hit.to(tl.int32), 0) > 0:
            pair = tok.to(tl.int64) * TOP_K + slot
            wt = tl.load(weights_ptr + pair, mask=hit, other=0.0).to(tl.float32)  # [BLOCK_T]
            w_rows = (rows.to(tl.int64) + e * dim)[:, None] * hidden  # [BLOCK_N, 1] (int64)
            h_rows = pair[None, :] * hidden  # [1, BLOCK_T]
            acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                kk = k0 + cols
                if EVEN_K:
                    w_mask = row_ok[:, None]
                    h_mask = hit[None, :]
                else:
                    w_mask = row_ok[:, None] & (kk < hidden)[None, :]
                    h_mask = hit[None, :] & (kk < hidden)[:, None]
                ht = tl.load(h_ptr + h_rows + kk[:, None], mask=h_mask, other=0.0)  # [BLOCK_K, BLOCK_T]
                a2 = tl.load(w2_ptr + w_rows + kk[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
                if UPCAST:
                    ht, a2 = ht.to(tl.float32), a2.to(tl.float32)
                acc = tl.dot(a2, ht, acc, input_precision=DOT_PRECISION)
            out += acc * wt[None, :]
    tl.store(out_ptr + tok.to(tl.int64)[None, :] * out_stride + rows[:, None], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (tok < n_tokens)[None, :])


# ---------------------------------------------------------------------------------- wrapper
def routed_experts_forward(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    valid_tokens: Optional[torch.Tensor | int] = None,
    blocks: GemvBlocks = DEFAULT_BLOCKS,
) -> torch.Tensor:
    """sum_j weights[t, j] * w2_e(silu(w1_e x_t) * w3_e x_t), e = experts[t, j], reading only routed experts.

    x [T, dim] (unit last stride), experts [T, k] integer ids in [0, E) (distinct per token, as top-k
    gives), weights [T, k], stacked contiguous w1 / w3 [E, hidden, dim] and w2 [E, dim, hidden], all
    of x's dtype; T <= MAX_KERNEL_TOKENS. `valid_tokens` (an int or a 0-d device tensor): only the
    leading rows are real tokens; the others are routed nowhere and their output rows are zeros.
    Returns [T, dim] in x's dtype. Two launches, no host sync; the grids depend on shapes only.
    """
    t, dim = x.shape
    k = experts.shape[1]
    n_experts, hidden = w1.shape[0], w1.shape[1]
    if experts.shape != (t, k) or weights.shape != (t, k):
        raise ValueError(f"experts {tuple(experts.shape)} and weights {tuple(weights.shape)} must be [{t}, k]")
    if w1.shape != (n_experts, hidden, dim) or w3.shape != w1.shape or w2.shape != (n_experts, dim, hidden):
        raise ValueError(f"expert weights w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} "
                         f"do not match [E, hidden, dim] / [E, dim, hidden] with dim {dim}")
    if not (w1.is_contiguous() and w2.is_contiguous() and w3.is_contiguous()):
        raise ValueError("routed_experts_forward needs contiguous stacked expert weights")
    if len({x.dtype, w1.dtype, w2.dtype, w3.dtype}) != 1 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x and the expert weights must share one of {KERNEL_DTYPES}, got "
                         f"{x.dtype}, {w1.dtype}, {w2.dtype}, {w3.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"x needs unit stride in its last dim, got strides {x.stride()}")
    if t > MAX_KERNEL_TOKENS:
        raise ValueError(f"{t} tokens exceed the routed-experts kernels' {MAX_KERNEL_TOKENS}; use grouped_mm")
    out = torch.empty(t, dim, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    experts = experts.contiguous()
    weights = weights.contiguous()
    n_real = t
    if isinstance(valid_tokens, torch.Tensor):
        if valid_tokens.numel() != 1:
            raise ValueError(f"valid_tokens must be a single count, got shape {tuple(valid_tokens.shape)}")
        valid_ptr, has_valid = valid_tokens, True
    else:
        valid_ptr, has_valid = experts, False
        if valid_tokens is not None:
            n_real = max(0, min(int(valid_tokens), t))
    h = torch.empty(t * k, hidden, dtype=x.dtype, device=x.device)
    upcast = x.dtype == torch.bfloat16 and not x.is_cuda  # the interpreter's tl.dot cannot multiply bf16
    precision = "ieee" if x.element_size() >= 4 else "tf32"
    block_t = max(16, triton.next_power_of_2(t))
    b = blocks
    _routed_w13_kernel[(triton.cdiv(hidden, b.block_h), min(n_experts, t * k))](
        x, experts, valid_ptr, w1, w3, h,
        n_real, t, dim, hidden, x.stride(0),
        TOP_K=k, HAS_VALID=has_valid, E_PAD=triton.next_power_of_2(n_experts),
        BLOCK_P=triton.next_power_of_2(t * k), BLOCK_T=block_t, BLOCK_H=b.block_h, BLOCK_D=b.block_d,
        EVEN_D=dim % b.block_d == 0, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=b.num_warps, num_stages=b.num_stages,
    )
    _routed_w2_kernel[(triton.cdiv(dim, b.block_n),)](
        h, experts, weights, valid_ptr, w2, out,
        n_real, t, dim, hidden, out.stride(0),
        N_EXPERTS=n_experts, TOP_K=k, HAS_VALID=has_valid, BLOCK_T=block_t, BLOCK_N=b.block_n,
        BLOCK_K=b.block_k, EVEN_K=hidden % b.block_k == 0, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return out


def routed_expert_bytes(n_routed: int, dim: int, hidden: int, element_size: int = 2) -> int:
    """Expert weight bytes the kernels read for `n_routed` distinct routed experts (w1, w3 and w2)."""
    return n_routed * 3 * dim * hidden * element_size
