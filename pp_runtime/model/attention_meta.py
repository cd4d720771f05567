"""Per-forward attention metadata, computed once and shared by every local layer.

Tokens travel as one flat, unpadded stream `[T, dim]` (all matmuls run on it). Attention
regroups the stream into *rows* (one row per sequence at inference, one packed training
sequence per row in fine-tuning) and applies a block-diagonal, causal, sliding-window mask
built from absolute positions and sequence ids. Only the diagonal blocks are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pp_runtime.errors import InputError
from pp_runtime.model.kv_cache import CacheAccess, positions_held, ring_index


@dataclass(frozen=True)
class SeqChunk:
    """`n_tokens` new tokens of the sequence in cache `slot`, starting at absolute `start`."""

    slot: int
    start: int
    n_tokens: int


@dataclass
class AttentionMeta:
    positions: torch.Tensor  # [T] absolute position of each flat token (for RoPE)
    cos: torch.Tensor  # [T, head_dim/2]
    sin: torch.Tensor  # [T, head_dim/2]
    row_index: Optional[torch.Tensor]  # [R, C] flat index of each row entry; None when the layout is the identity
    unpad_index: Optional[torch.Tensor]  # [T] index into the flattened [R*C] rows; None for the identity
    n_rows: int
    row_len: int  # C
    mask: Optional[torch.Tensor]  # [R, 1, G*C, K] bool, True = attend; None means plain causal (is_causal)
    last_index: torch.Tensor  # [R] flat index of the last token of each sequence (inference) or row
    cache_access: Optional[CacheAccess] = None  # inference: how this step reads and extends the KV cache

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [R, C, ...]."""
        if self.row_index is None:
            return x.view(self.n_rows, self.row_len, *x.shape[1:])
        return x[self.row_index]

    def from_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[R, C, ...] -> [T, ...]."""
        flat = x.reshape(self.n_rows * self.row_len, *x.shape[2:])
        if self.unpad_index is None:
            return flat
        return flat.index_select(0, self.unpad_index)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles, computed in float64 (positions can be large), kept in at least float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _window_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


def _expand_groups(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[R, C, K] -> [R, 1, G*C, K]: query heads of one KV group are stacked as extra rows."""
    r, c, k = mask.shape
    return mask[:, None, None].expand(r, 1, groups, c, k).reshape(r, 1, groups * c, k)


def build_inference_meta(
    chunks: Sequence[SeqChunk],
    *,
    capacity: int,
    window: Optional[int],
    head_dim: int,
    rope_theta: float,
    n_kv_groups: int,
    device: torch.device | str = "cpu",
    rope_dtype: torch.dtype = torch.float32,
    min_read_len: int = 0,
) -> AttentionMeta:
    """Metadata for one step over packed sequences that read and extend a rolling KV cache.

    Each chunk attends to what its slot's ring holds (positions < start) plus its own tokens; the
    ring's layout is pp_runtime/model/kv_cache.py's (`positions_held`, `ring_index`).
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence chunk")
    for ch in chunks:
        if ch.n_tokens < 1:
            raise InputError("a sequence chunk must hold at least one token")
        if window is None and ch.start + ch.n_tokens > capacity:
            raise InputError(
                f"sequence reaches {ch.start + ch.n_tokens} tokens but the KV cache holds {capacity} "
                "and the model has no sliding window; raise the cache length or shorten the request"
            )
    if window is not None and capacity < window:
        if any(ch.start + ch.n_tokens > capacity for ch in chunks):
            raise InputError(f"sequence longer than the KV cache ({capacity} tokens, window {window})")
    cpu = torch.device("cpu")
    n = torch.tensor([c.n_tokens for c in chunks], dtype=torch.long)
    start = torch.tensor([c.start for c in chunks], dtype=torch.long)
    slots = torch.tensor([c.slot for c in chunks], dtype=torch.long)
    r = len(chunks)
    c_max = int(n.max())
    offsets = torch.cumsum(n, 0) - n  # flat offset of each row
    t = torch.arange(c_max)
    valid = t[None, :] < n[:, None]  # [R, C]
    q_pos = start[:, None] + t[None, :]  # [R, C]
    positions = q_pos[valid]  # row-major == flat order
    identity = bool((n == c_max).all())
    row_index = None if identity else torch.where(valid, offsets[:, None] + t[None, :], 0)
    unpad_index = None if identity else (torch.arange(r)[:, None] * c_max + t[None, :])[valid]

    write_first = c_max == 1
    filled = start + (1 if write_first else 0)  # tokens the ring holds when attention reads it
    read_len = int(min(capacity, max(int(filled.max()), min_read_len)))  # a floor keeps shapes stable for graphs
    ring_pos = positions_held(filled, read_len, capacity)  # [R, L]
    ring_valid = ring_pos >= 0
    allowed_ring = ring_valid[:, None, :] & _window_allowed(q_pos[:, :, None], ring_pos[:, None, :], window)
    if write_first:
        allowed = allowed_ring
    else:
        allowed_new = valid[:, None, :] & _window_allowed(q_pos[:, :, None], q_pos[:, None, :], window)
        allowed = torch.cat([allowed_ring, allowed_new], dim=2)
    allowed |= ~valid[:, :, None]  # padded query rows attend anywhere; their output is dropped

    # Only the last `capacity` tokens of a chunk survive in the ring; writing earlier ones would
    # make the scatter order-dependent.
    keep = valid & (t[None, :] >= (n[:, None] - capacity))
    write_src = (offsets[:, None] + t[None, :])[keep]
    write_slot = slots[:, None].expand(r, c_max)[keep]
    write_pos = ring_index(q_pos, capacity)[keep]

    cos, sin = rope_angles(positions, head_dim, rope_theta, rope_dtype)
    dev = torch.device(device)
    mv = (lambda x: None if x is None else x.to(dev, non_blocking=True)) if dev != cpu else (lambda x: x)
    return AttentionMeta(
        positions=mv(positions),
        cos=mv(cos),
        sin=mv(sin),
        row_index=mv(row_index),
        unpad_index=mv(unpad_index),
        n_rows=r,
        row_len=c_max,
        mask=mv(_expand_groups(allowed, n_kv_groups)),
        last_index=mv(offsets + n - 1),
        cache_access=CacheAccess(mv(slots), read_len, write_first, mv(write_src), mv(write_slot), mv(write_pos)),
    )


def build_training_meta(
    doc_lens: Sequence[Sequence[int]],
    *,
    window: Optional[int],
    head_dim: int,
    rope_theta: float,
    n_kv_groups: int,
    device: torch.device | str = "cpu",
    rope_dtype: torch.dtype = torch.float32,
) -> AttentionMeta:
    """Metadata for rows of equal length, each packing several documents (no cache).

    `doc_lens[r]` lists the document lengths in row r; they must sum to the same row length.
    Positions restart at 0 in each document and the mask is block-diagonal over documents.
    """
    rows = [list(map(int, d)) for d in doc_lens]
    row_len = sum(rows[0])
    if any(sum(d) != row_len for d in rows) or any(x < 1 for d in rows for x in d):
        raise ValueError(f"every row must pack documents summing to the same length, got {rows}")
    # Only the [R, C] ids and positions are made on the host; the [R, 1, G*C, C] mask and the rotary
    # angles are computed where they are used (on a GPU, building the mask of one 2048-token row of
    # packed documents on the host and copying it cost about 40 ms per micro-batch).
    dev = torch.device(device)
    doc_id = torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in rows]).to(dev)  # [R, C]
    pos = torch.stack([torch.cat([torch.arange(x) for x in d]) for d in rows]).to(dev)
    single_doc = all(len(d) == 1 for d in rows)
    if single_doc and (window is None or row_len <= window):
        mask = None  # plain causal: lets SDPA use its fused kernels
    else:
        same = doc_id[:, :, None] == doc_id[:, None, :]
        mask = _expand_groups(same & _window_allowed(pos[:, :, None], pos[:, None, :], window), n_kv_groups)
    positions = pos.reshape(-1)
    cos, sin = rope_angles(positions, head_dim, rope_theta, rope_dtype)
    r = len(rows)
    return AttentionMeta(
        positions=positions,
        cos=cos,
        sin=sin,
        row_index=None,
        unpad_index=None,
        n_rows=r,
        row_len=row_len,
        mask=mask,
        last_index=torch.arange(r, device=dev) * row_len + row_len - 1,
    )
