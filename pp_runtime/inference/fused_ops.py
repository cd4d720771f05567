"""Fused elementwise ops for the decoder's hot path: residual add + RMSNorm, RoPE on q and k, SwiGLU.

Eagerly each is a chain of small kernels (RMSNorm alone is about seven), and at decode batch sizes
their launch cost exceeds the time to read a layer's weights, even inside a CUDA graph. Each op
here is one Triton kernel computing what pp_runtime.model.transformer computes. Off CUDA they run the same
math in plain torch, so CPU runs never need Triton; with TRITON_INTERPRET=1 the kernels run on
CPU tensors through Triton's interpreter (for tests). The kernels have no backward, so whenever
autograd needs a gradient (fine-tuning) the wrappers take the torch path too.

The kernels launch on grids fixed by shapes, never read values on the host and allocate only
shape-dependent outputs, so they can be captured in a CUDA graph (after one warm-up call that
compiles them for those shapes).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from pp_runtime.model.attention_meta import rope_angles

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NORM_DIM = 16384  # one row lives in one block of registers
_SILU_BLOCK = 1024


def _triton_path(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Kernels run for CUDA tensors (or any tensor under Triton's interpreter) of a dtype they compute in fp32.

    They have no backward: when autograd needs a gradient the differentiable torch path runs instead.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False
    return x.dtype in KERNEL_DTYPES and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _kernels():
    from pp_runtime.inference import fused_kernels

    return fused_kernels


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.element_size() < 4 else x


# ---------------------------------------------------------------------------- residual add + RMSNorm


def add_rms_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) with h = x + residual (h = x itself when residual is None).

    Rounds as model.RMSNorm does: h is rounded to x.dtype before it is normalized, and the
    normalized row is cast to x.dtype before the weight multiply. x: [..., dim] with unit stride
    in the last dim; residual: same shape and dtype; weight: [dim], x.dtype.
    """
    if not _triton_path(x, residual, weight):
        return _add_rms_norm_torch(x, residual, weight, eps)
    dim = x.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: x needs unit stride in its last dim, got strides {x.stride()}")
    if weight.shape != (dim,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"add_rms_norm: weight must be a contiguous [{dim}] {x.dtype} tensor, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"add_rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}, unit last stride), "
                         f"got {tuple(residual.shape)}, {residual.dtype}, strides {residual.stride()}")
    if dim > MAX_NORM_DIM:
        raise ValueError(f"add_rms_norm: dim {dim} exceeds the kernel's {MAX_NORM_DIM}")
    x2 = x.reshape(-1, dim)
    r2 = residual.reshape(-1, dim) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x2
    rows = x2.shape[0]
    if rows:
        block = _next_pow2(dim)
        _kernels().add_rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            dim, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
        )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else x)


def _add_rms_norm_torch(x, residual, weight, eps):
    h = x if residual is None else x + residual
    hf = _upcast(h)
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight, h


# ---------------------------------------------------------------------------- rotary embedding


def rope_tables(max_pos: int, head_dim: int, theta: float, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, head_dim/2] float32 for every position, built once per model.

    Computed on CPU in float64 exactly as attention_meta.rope_angles builds each step's cos/sin,
    so a table row is bit-identical to the row the eager path uses.
    """
    cos, sin = rope_angles(torch.arange(max_pos), head_dim, theta, torch.float32)
    return cos.to(device), sin.to(device)


def rope_qk_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by RoPE at `positions` [T], in one launch.

    Mistral's interleaved pairs (x0, x1), (x2, x3), ... computed in fp32 and cast back, as
    model.apply_rope does. q and k may be strided views (e.g. of a fused qkv output) but need unit
    stride in the last dim. Tables from rope_tables(); positions must be < their length (not
    checked: that would need a host sync).
    """
    if not _triton_path(q, k):
        _rope_qk_torch(q, k, positions, cos_table, sin_table)
        return
    t, n_q, d = q.shape
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d or k.dtype != q.dtype:
        raise ValueError(f"rope_qk_: k must be [{t}, Hkv, {d}] {q.dtype}, got {tuple(k.shape)} {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rope_qk_: q and k need unit stride in the last dim, got {q.stride()} and {k.stride()}")
    if d % 2:
        raise ValueError(f"rope_qk_: head_dim must be even, got {d}")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != d // 2 or table.dtype != torch.float32 or not table.is_contiguous():
            raise ValueError(f"rope_qk_: {name} must be a contiguous [P, {d // 2}] float32 tensor (rope_tables), "
                             f"got {tuple(table.shape)} {table.dtype}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_qk_: positions must be [{t}] int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    if t:
        half_block = _next_pow2(d // 2)
        _kernels().rope_qk_kernel[(t,)](
            q, k, positions, cos_table, sin_table,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_table.stride(0),
            n_q, k.shape[1], d,
            BLOCK_HQ=_next_pow2(n_q), BLOCK_HK=_next_pow2(k.shape[1]), BLOCK_HALF=half_block, num_warps=4,
        )


def _rope_qk_torch(q, k, positions, cos_table, sin_table):
    cos, sin = cos_table.index_select(0, positions), sin_table.index_select(0, positions)
    q.copy_(_rotate_pairs(q, cos, sin))
    k.copy_(_rotate_pairs(k, cos, sin))


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = _upcast(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------- SwiGLU


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] -> [T, F]: SwiGLU on the output of a fused [w1; w3] matmul.

    The kernel computes in fp32 and rounds once, where eager `F.silu(a) * b` in bf16/fp16 also
    rounds silu(a): results are at most one rounding of the output dtype from eager; in float32
    they agree to fp32 precision. gate_up: [T, 2F] with unit stride in the last dim.
    """
    if not _triton_path(gate_up):
        return _silu_mul_torch(gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_mul: gate_up must be [T, 2F] with unit last stride, "
                         f"got {tuple(gate_up.shape)} strides {gate_up.stride()}")
    t, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, f), dtype=gate_up.dtype, device=gate_up.device)
    if t and f:
        block = min(_SILU_BLOCK, _next_pow2(f))
        _kernels().silu_mul_kernel[(t, _cdiv(f, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), f, BLOCK=block, num_warps=4,
        )
    return out


def _silu_mul_torch(gate_up):
    a, b = gate_up.chunk(2, dim=-1)
    return F.silu(a) * b


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
