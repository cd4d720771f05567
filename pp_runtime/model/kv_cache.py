"""Rolling (ring-buffer) KV cache for the layers one stage holds, and the one place that knows its
layout: a sequence owns one slot, and its token at position p lives at ring index p % capacity, so
memory is bounded by the window, not by the sequence length.

A step's `CacheAccess` (built with the step's attention metadata) says which slots its rows read and
where each new token is written; `RollingKVCache.view(layer, access)` gives a layer the object its
attention calls: `keys, values = view.update(k, v, to_rows)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


def ring_index(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Where the token at each absolute position is stored."""
    return torch.remainder(positions, capacity)


def positions_held(filled: torch.Tensor, read_len: int, capacity: int) -> torch.Tensor:
    """[R, read_len]: the absolute position stored at ring index j of each row's slot once `filled[r]`
    tokens were written (negative where nothing was written yet)."""
    j = torch.arange(read_len)
    last = filled[:, None] - 1
    return last - torch.remainder(last - j[None, :], capacity)


@dataclass
class CacheAccess:
    """How one step reads and extends the cache (the same for every layer)."""

    slots: torch.Tensor  # [R] slot read by each row
    read_len: int  # ring entries read per row
    write_first: bool  # decode: write the new token into the ring, then attend to the ring only
    write_src: torch.Tensor  # [N] flat token indices written
    write_slot: torch.Tensor  # [N]
    write_pos: torch.Tensor  # [N] ring index (`ring_index` of the token's position)


class LayerCacheView:
    """One layer's K and V rings seen through one step's access."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, access: CacheAccess) -> None:
        self.k, self.v, self.access = k, v, access

    def update(self, k: torch.Tensor, v: torch.Tensor,
               to_rows: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's new keys/values `[T, Hkv, D]` and return what each row attends to,
        `[R, K, Hkv, D]`: the ring (its entries in ring order), then, unless decoding, the row's own
        new tokens (`to_rows` regroups the flat stream)."""
        a = self.access
        if a.write_first:
            self._write(k, v)
            return self._read(self.k), self._read(self.v)
        keys = torch.cat([self._read(self.k), to_rows(k)], dim=1)
        values = torch.cat([self._read(self.v), to_rows(v)], dim=1)
        self._write(k, v)
        return keys, values

    def _read(self, ring: torch.Tensor) -> torch.Tensor:
        return ring.index_select(0, self.access.slots)[:, : self.access.read_len]

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        a = self.access
        self.k[a.write_slot, a.write_pos] = k.index_select(0, a.write_src)
        self.v[a.write_slot, a.write_pos] = v.index_select(0, a.write_src)


class RollingKVCache:
    """K and V of shape `[n_local_layers, n_slots, capacity, n_kv_heads, head_dim]`; layers are
    addressed by *global* id."""

    def __init__(
        self,
        layer_ids: Sequence[int],
        n_slots: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layer_ids = list(layer_ids)
        self._local = {g: i for i, g in enumerate(self.layer_ids)}
        self.n_slots = n_slots
        self.capacity = capacity
        shape = (len(self.layer_ids), n_slots, capacity, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw rings of one layer (the GPU kernels address them themselves)."""
        i = self._local[layer_id]
        return self.k[i], self.v[i]

    def view(self, layer_id: int, access: Optional[CacheAccess]) -> LayerCacheView:
        if access is None:
            raise ValueError("a cached forward needs the step's cache access (build_inference_meta)")
        return LayerCacheView(*self.layer(layer_id), access)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
