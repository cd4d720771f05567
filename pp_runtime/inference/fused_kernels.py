"""Triton kernels behind pp_runtime.inference.fused_ops (imported only when a Triton path runs).

Kept apart from the wrappers so that CPU runs never import Triton, and so that the kernels are
defined (and `TRITON_INTERPRET` read by `triton.jit`) only at first use.
"""

import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_stride, res_stride, out_stride, res_out_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row per program: h = x (+ residual), stored rounded; out = (h * rsqrt(mean(h^2) + eps)).to(x) * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = h.to(x_ptr.dtype.element_ty)  # the residual stream is rounded before it is normalized
        tl.store(res_out_ptr + row * res_out_stride + cols, h, mask=mask)
        h = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(base, head_stride, n_heads, c, s, cols, col_mask,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the interleaved pairs of `n_heads` heads of one token in place (c, s: [BLOCK_HALF] fp32)."""
    heads = tl.arange(0, BLOCK_H)
    offs = heads[:, None] * head_stride + cols[None, :]
    mask = (heads[:, None] < n_heads) & col_mask[None, :]
    x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
    out0 = x0 * c[None, :] - x1 * s[None, :]
    out1 = x0 * s[None, :] + x1 * c[None, :]
    out = tl.reshape(tl.join(out0, out1), (BLOCK_H, 2 * BLOCK_HALF))
    tl.store(base + offs, out.to(base.dtype.element_ty), mask=mask)


@triton.jit
def rope_qk_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, table_stride,
    n_q_heads, n_k_heads, head_dim,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One token per program: all its q and k heads, with cos/sin read once from the tables."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    half_mask = half < head_dim // 2
    c = tl.load(cos_ptr + pos * table_stride + half, mask=half_mask, other=0.0)
    s = tl.load(sin_ptr + pos * table_stride + half, mask=half_mask, other=0.0)
    cols = tl.arange(0, 2 * BLOCK_HALF)
    col_mask = cols < head_dim
    _rotate_heads(q_ptr + t * q_stride_t, q_stride_h, n_q_heads, c, s, cols, col_mask, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, n_k_heads, c, s, cols, col_mask, BLOCK_HK, BLOCK_HALF)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, gu_stride, out_stride, n_cols, BLOCK: tl.constexpr):
    """out[t, j] = silu(gu[t, j]) * gu[t, n_cols + j], in fp32 with one rounding."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    base = gu_ptr + row * gu_stride
    a = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
