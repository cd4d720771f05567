"""Varlen attention over the rolling KV cache: one Triton launch per layer for a packed micro-batch.

The flat token stream `[T, ...]` holds prefill chunks and decode tokens of many sequences. Work is
cut into query blocks of `block_m` tokens of one sequence; a program serves one block and one KV
head, with the G query heads of that KV head stacked as tile rows, so every K/V tile is loaded
once for all G heads. Keys come from two places under one online softmax: the sequence's ring
(positions before this step, read before the step's tokens are written) and the step's own new
tokens in the flat stream. Cost follows the real tokens: no padding to the longest chunk.

Metadata has fixed shapes (`VarlenLayout`), so a CUDA graph can replay a step after the host
refills one int32 buffer; nothing on the device path syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class VarlenBatch:
    """Device int32 views of one step's plan (see `VarlenLayout`)."""

    seq_slot: torch.Tensor  # [S] cache slot of each sequence
    seq_start: torch.Tensor  # [S] absolute position of its first new token
    seq_len: torch.Tensor  # [S] new tokens this step; 0 = unused row
    seq_offset: torch.Tensor  # [S] flat index of its first new token
    block_seq: torch.Tensor  # [NB] sequence of each query block; -1 = no work
    block_first: torch.Tensor  # [NB] index of the block's first token within its sequence
    block_m: int  # tokens per query block; the plan and the kernels must agree on it


@dataclass(frozen=True)
class VarlenLayout:
    """Fixed shapes of a step's metadata: up to `max_seqs` sequences cut into `max_blocks` blocks.

    The whole plan is one int32 array (`plan`), so a step costs one host-to-device copy into a
    buffer whose views (`views`) stay at fixed addresses for CUDA graphs.
    """

    max_seqs: int
    max_blocks: int
    block_m: int

    def __post_init__(self) -> None:
        if self.block_m < 1 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m={self.block_m} must be a power of two")

    @classmethod
    def for_tokens(cls, max_tokens: int, max_seqs: int, block_m: int) -> "VarlenLayout":
        """Room for any mix of at most `max_seqs` sequences with at most `max_tokens` new tokens in all."""
        return cls(max_seqs, triton.cdiv(max_tokens, block_m) + max_seqs, block_m)

    @property
    def size(self) -> int:
        return 4 * self.max_seqs + 2 * self.max_blocks

    def plan(self, slots: Sequence[int], starts: Sequence[int], lens: Sequence[int]) -> np.ndarray:
        """Packed plan for sequences laid out back to back in the flat stream, in the order given.

        Blocks are ordered by their last query position, latest first: the longest-running
        programs start first, which shortens the tail of a mixed launch.
        """
        lens_a = np.asarray(lens, dtype=np.int64).reshape(-1)
        starts_a = np.asarray(starts, dtype=np.int64).reshape(-1)
        slots_a = np.asarray(slots, dtype=np.int64).reshape(-1)
        n = lens_a.shape[0]
        if not (starts_a.shape[0] == slots_a.shape[0] == n):
            raise ValueError("slots, starts and lens must have one entry per sequence")
        if n > self.max_seqs:
            raise ValueError(f"{n} sequences exceed the layout's max_seqs={self.max_seqs}; plan a larger layout")
        if n and (lens_a.min() < 0 or starts_a.min() < 0 or slots_a.min() < 0):
            raise ValueError("sequence lengths, starts and slots must be non-negative")
        per_seq = -(-lens_a // self.block_m)
        n_blocks = int(per_seq.sum())
        if n_blocks > self.max_blocks:
            raise ValueError(f"{n_blocks} query blocks exceed the layout's max_blocks={self.max_blocks}; "
                             "plan the layout with VarlenLayout.for_tokens for this token count")
        block_seq = np.repeat(np.arange(n), per_seq)
        block_first = (np.arange(n_blocks) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)) * self.block_m
        last_pos = starts_a[block_seq] + np.minimum(block_first + self.block_m, lens_a[block_seq])
        order = np.argsort(-last_pos, kind="stable")

        s, nb = self.max_seqs, self.max_blocks
        out = np.zeros(self.size, dtype=np.int32)
        out[0:n] = slots_a
        out[s : s + n] = starts_a
        out[2 * s : 2 * s + n] = lens_a
        out[3 * s : 3 * s + n] = np.cumsum(lens_a) - lens_a
        out[4 * s : 4 * s + nb] = -1
        out[4 * s : 4 * s + n_blocks] = block_seq[order]
        out[4 * s + nb : 4 * s + nb + n_blocks] = block_first[order]
        return out

    def views(self, buf: torch.Tensor) -> VarlenBatch:
        """The plan's fields as views of a device int32 buffer of `size` entries."""
        if buf.dtype != torch.int32 or buf.shape != (self.size,):
            raise ValueError(f"the plan buffer must be int32 of shape ({self.size},), "
                             f"got {buf.dtype} {tuple(buf.shape)}")
        s, nb = self.max_seqs, self.max_blocks
        return VarlenBatch(
            seq_slot=buf[0:s], seq_start=buf[s : 2 * s], seq_len=buf[2 * s : 3 * s],
            seq_offset=buf[3 * s : 4 * s], block_seq=buf[4 * s : 4 * s + nb],
            block_first=buf[4 * s + nb : 4 * s + 2 * nb], block_m=self.block_m,
        )


def plan_varlen(slots: Sequence[int], starts: Sequence[int], lens: Sequence[int], *, max_seqs: int,
                max_blocks: int, block_m: int, device: torch.device | str = "cpu") -> VarlenBatch:
    """One-off plan on `device` (tests, benchmarks); a step loop keeps one buffer and refills it instead."""
    layout = VarlenLayout(max_seqs, max_blocks, block_m)
    return layout.views(torch.from_numpy(layout.plan(slots, starts, lens)).to(device))


def default_block_m(n_groups: int, decode_only: bool) -> int:
    """Tokens per query block: 16-row tiles for decode, 128-row tiles when chunks are long."""
    rows = 16 if decode_only else 128
    return max(1, rows // n_groups)


def decode_splits(n_blocks: int, n_kv_heads: int, read_len: int, *, n_sms: int = 132, block_n: int = 64) -> int:
    """Split-K factor that fills the GPU when few (block, KV head) programs read long rings."""
    programs = max(1, n_blocks * n_kv_heads)
    want = triton.cdiv(2 * n_sms, programs)
    return int(max(1, min(want, triton.cdiv(read_len, 4 * block_n), 32)))


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of log2-scaled scores `s` (-inf where not allowed) and values `v` into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing allowed yet stay at zero weight
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, q_pos, k_base, v_base, k_stride, v_stride, kp_lo, kp_hi, shift, capacity,
                  window, qk_scale, d, d_ok, FROM_RING: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the keys at positions [kp_lo, kp_hi) of one source (ring: kp % capacity, stream: kp + shift).

    MASK applies each row's causal window; without it only the range end is masked (the band every row sees).
    """
    cols = tl.arange(0, BLOCK_N)
    for kb in range(kp_lo, kp_hi, BLOCK_N):
        kp = kb + cols
        k_ok = kp < kp_hi
        if FROM_RING:
            idx = (kp % capacity).to(tl.int64)
        else:
            idx = (kp + shift).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + idx[:, None] * k_stride + d[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(v_base + idx[:, None] * v_stride + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            allowed = k_ok[None, :] & (kp[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                allowed = allowed & (q_pos[:, None] - kp[None, :] < window)
        else:
            allowed = k_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vt, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _ring_attn_kernel(
    q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, out_ptr, ws_ptr, ml_ptr,
    seq_slot_ptr, seq_start_ptr, seq_len_ptr, seq_off_ptr, block_seq_ptr, block_first_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    sck_slot, sck_pos, sck_h, scv_slot, scv_pos, scv_h,
    so_t, so_h, sws_split, sws_t, sws_h, sml_split, sml_t, sml_h,
    capacity, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(block_seq_ptr + blk)
    if seq < 0:
        return
    slot = tl.load(seq_slot_ptr + seq).to(tl.int64)
    start = tl.load(seq_start_ptr + seq)
    n_new = tl.load(seq_len_ptr + seq)
    off = tl.load(seq_off_ptr + seq)
    first = tl.load(block_first_ptr + blk)

    rows = tl.arange(0, BLOCK_Q)
    tok = first + rows // G  # token index within the sequence
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_M * G) & (tok < n_new)
    q_pos = start + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    flat = (off + tok).to(tl.int64)
    q = tl.load(q_ptr + flat[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Key positions this block can see: [lo, hi), the ring below `start`, new tokens from `start`.
    last = start + tl.minimum(first + BLOCK_M, n_new) - 1
    lo = tl.maximum(start - capacity, 0)
    if HAS_WINDOW:
        lo = tl.maximum(lo, start + first - window + 1)
    hi = last + 1
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    # Keys in [band_lo, band_hi) are visible to every row of the block: no per-row mask there.
    band_lo = lo
    if HAS_WINDOW:
        band_lo = tl.minimum(tl.maximum(last - window + 1, lo), hi)
    band_hi = tl.minimum(tl.maximum(start + first, band_lo), hi)

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    ck_base = ck_ptr + slot * sck_slot + kvh * sck_h
    cv_base = cv_ptr + slot * scv_slot + kvh * scv_h
    k_base = k_ptr + kvh * sk_h
    v_base = v_ptr + kvh * sv_h
    shift = off - start  # flat index of new-token position kp is kp + shift
    for seg in tl.static_range(3):
        if seg == 0:
            seg_lo, seg_hi = lo, band_lo
        elif seg == 1:
            seg_lo, seg_hi = band_lo, band_hi
        else:
            seg_lo, seg_hi = band_hi, hi
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, ck_base, cv_base, sck_pos, scv_pos, seg_lo, tl.minimum(seg_hi, start), 0,
            capacity, window, qk_scale, d, d_ok, True, seg != 1, HAS_WINDOW, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, k_base, v_base, sk_t, sv_t, tl.maximum(seg_lo, start), seg_hi, shift,
            capacity, window, qk_scale, d, d_ok, False, seg != 1, HAS_WINDOW, BLOCK_N, DOT_PRECISION)

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS > 1:
        ws = ws_ptr + split.to(tl.int64) * sws_split + flat[:, None] * sws_t + head[:, None] * sws_h + d[None, :]
        tl.store(ws, acc, mask=out_mask)
        ml = ml_ptr + split.to(tl.int64) * sml_split + flat * sml_t + head * sml_h
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + flat[:, None] * so_t + head[:, None] * so_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(ws_ptr, ml_ptr, out_ptr, sws_split, sws_t, sws_h, sml_split, sml_t, sml_h, so_t, so_h,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """out = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m); untouched tokens get zeros."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ml = ml_ptr + sp * sml_split + t * sml_t + h * sml_h
    m = tl.load(ml)
    l = tl.load(ml + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.math.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)), 0.0)
    acc = tl.load(ws_ptr + sp[:, None] * sws_split + t * sws_t + h * sws_h + d[None, :],
                  mask=(w > 0)[:, None] & d_ok[None, :], other=0.0)
    num = tl.sum(w[:, None] * acc, 0)
    den = tl.sum(w * tl.where(w > 0, l, 0.0), 0)
    o = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + t * so_t + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _ring_write_kernel(
    k_ptr, v_ptr, ck_ptr, cv_ptr, seq_slot_ptr, seq_start_ptr, seq_len_ptr, seq_off_ptr, block_seq_ptr,
    block_first_ptr, sk_t, sk_h, sv_t, sv_h, sck_slot, sck_pos, sck_h, scv_slot, scv_pos, scv_h, capacity,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(block_seq_ptr + blk)
    if seq < 0:
        return
    slot = tl.load(seq_slot_ptr + seq).to(tl.int64)
    start = tl.load(seq_start_ptr + seq)
    n_new = tl.load(seq_len_ptr + seq)
    off = tl.load(seq_off_ptr + seq)
    tok = tl.load(block_first_ptr + blk) + tl.arange(0, BLOCK_M)
    keep = (tok < n_new) & (tok >= n_new - capacity)  # only the last `capacity` tokens survive in the ring
    ring = ((start + tok) % capacity).to(tl.int64)
    src = (off + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = keep[:, None] & (d < HEAD_DIM)[None, :]
    kt = tl.load(k_ptr + src[:, None] * sk_t + h * sk_h + d[None, :], mask=mask)
    vt = tl.load(v_ptr + src[:, None] * sv_t + h * sv_h + d[None, :], mask=mask)
    tl.store(ck_ptr + slot * sck_slot + ring[:, None] * sck_pos + h * sck_h + d[None, :], kt, mask=mask)
    tl.store(cv_ptr + slot * scv_slot + ring[:, None] * scv_pos + h * scv_h + d[None, :], vt, mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or cache_k.dim() != 4 or cache_v.dim() != 4:
        raise ValueError("expected q [T, H, D], k/v [T, Hkv, D] and caches [slots, capacity, Hkv, D]")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if cache_k.shape != cache_v.shape or cache_k.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache {tuple(cache_k.shape)} does not match k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if len({q.dtype, k.dtype, v.dtype, cache_k.dtype, cache_v.dtype}) != 1:
        raise ValueError("q, k, v and the caches must share one dtype")
    for name, x in (("q", q), ("k", k), ("v", v), ("cache_k", cache_k), ("cache_v", cache_v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, batch: VarlenBatch, *, window: Optional[int], scale: Optional[float] = None,
                   num_splits: int = 1, block_n: int = 64, num_warps: Optional[int] = None,
                   num_stages: Optional[int] = None) -> torch.Tensor:
    """Causal (sliding-window) attention of a packed step over each sequence's ring plus its new tokens.

    q [T, H, D], k/v [T, Hkv, D] (RoPE applied), caches [slots, capacity, Hkv, D], all one dtype;
    returns [T, H, D] in q's dtype (fp32 accumulation); tokens outside every sequence get zeros.
    The caches are only read: call `ring_write` afterwards. `num_splits > 1` splits each block's
    keys over that many programs (flash-decoding; rounded up to a power of two) and merges them in
    a second launch. Launch shape: (max_blocks, Hkv, num_splits) programs of block_m * G query rows.
    """
    _check(q, k, v, cache_k, cache_v)
    t, h, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    rows = batch.block_m * g
    block_q = max(16, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(d))
    if block_n < 16 or block_n & (block_n - 1) or num_splits < 1:
        raise ValueError(f"block_n={block_n} must be a power of two >= 16 and num_splits={num_splits} >= 1")
    capacity = cache_k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_blocks = batch.block_seq.shape[0]
    if num_warps is None:
        num_warps = 8 if block_q >= 128 and block_d >= 128 else 4
    if num_stages is None:
        num_stages = 3 if block_q >= 64 and q.element_size() < 4 else 2

    num_splits = triton.next_power_of_2(num_splits)
    if num_splits > 1:
        out = torch.empty_like(q)
        ws = torch.empty((num_splits, t, h, d), dtype=torch.float32, device=q.device)
        ml = torch.full((num_splits, t, h, 2), float("-inf"), dtype=torch.float32, device=q.device)
        ws_strides, ml_strides = ws.stride()[:3], ml.stride()[:3]
    else:
        out = torch.zeros_like(q)
        ws = ml = out  # not touched without splits
        ws_strides = ml_strides = (0, 0, 0)
    _ring_attn_kernel[(n_blocks, h_kv, num_splits)](
        q, k, v, cache_k, cache_v, out, ws, ml,
        batch.seq_slot, batch.seq_start, batch.seq_len, batch.seq_offset, batch.block_seq, batch.block_first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *cache_k.stride()[:3], *cache_v.stride()[:3], out.stride(0), out.stride(1), *ws_strides, *ml_strides,
        capacity, window or 0, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, G=g, BLOCK_M=batch.block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.element_size() >= 4 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(t, h)](
            ws, ml, out, ws.stride(0), ws.stride(1), ws.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
            out.stride(0), out.stride(1), HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4,
        )
    return out


def ring_write(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: VarlenBatch) -> None:
    """Store each sequence's new K/V at ring index `pos % capacity` of its slot (its last `capacity` tokens only)."""
    if k.shape != v.shape or cache_k.shape != cache_v.shape or cache_k.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache {tuple(cache_k.shape)}")
    if k.dtype != cache_k.dtype or v.dtype != cache_v.dtype or k.stride(-1) != 1 or cache_k.stride(-1) != 1:
        raise ValueError("k/v must match the cache dtype and be contiguous in head_dim")
    h_kv, d = k.shape[1], k.shape[2]
    _ring_write_kernel[(batch.block_seq.shape[0], h_kv)](
        k, v, cache_k, cache_v, batch.seq_slot, batch.seq_start, batch.seq_len, batch.seq_offset, batch.block_seq,
        batch.block_first, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *cache_k.stride()[:3], *cache_v.stride()[:3], cache_k.shape[1],
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=batch.block_m,
    )
