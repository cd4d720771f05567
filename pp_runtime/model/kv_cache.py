"""Rolling (ring-buffer) KV cache for the layers one stage holds."""

from __future__ import annotations

from typing import Sequence

import torch


class RollingKVCache:
    """K and V of shape `[n_local_layers, n_slots, capacity, n_kv_heads, head_dim]`.

    A sequence owns one slot; its token at position p lives at ring index `p % capacity`, so memory is
    bounded by the window, not by the sequence length. Layers are addressed by *global* id.
    """

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
        i = self._local[layer_id]
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
