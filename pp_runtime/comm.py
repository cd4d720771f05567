"""Point-to-point messages between pipeline stages.

Every message is self-describing: a fixed-size header announces the shapes and dtypes of the
tensors that follow, so variable-length packed micro-batches never freeze a shape. Sends are
asynchronous and kept alive until they complete; NCCL on GPU, gloo on CPU, same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

HEADER_LEN = 16
MAX_TENSORS = 3
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]

KIND_DATA, KIND_STOP, KIND_ABORT = 0, 1, 2


@dataclass
class Message:
    kind: int
    tag: int  # caller-defined (micro-batch id, ...)
    tensors: list[torch.Tensor]


class PeerLink:
    """Ordered, typed messages to and from neighbouring ranks of one process group."""

    def __init__(self, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
        self.device = device
        self.group = group
        self._pending: list[tuple[dist.Work, list[torch.Tensor]]] = []

    def send(self, peer: int, kind: int, tensors: Sequence[torch.Tensor] = (), tag: int = 0) -> None:
        """Asynchronous send to global rank `peer`; tensors stay referenced until the send completes."""
        if len(tensors) > MAX_TENSORS:
            raise ValueError(f"at most {MAX_TENSORS} tensors per message")
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[2] = kind, tag, len(tensors)
        for i, t in enumerate(tensors):
            if t.dim() > 2:
                raise ValueError("messages carry tensors of at most 2 dimensions")
            shape = list(t.shape) + [1] * (2 - t.dim())
            header[3 + 4 * i : 7 + 4 * i] = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *shape])
        bufs = [header.to(self.device)] + [t.contiguous() for t in tensors]
        works = [dist.isend(b, peer, group=self.group) for b in bufs]
        self._pending.append((works, bufs))
        self._reap()

    def recv(self, peer: int) -> Message:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(header, peer, group=self.group)
        h = header.tolist()
        tensors = []
        for i in range(h[2]):
            dtype_i, ndim, d0, d1 = h[3 + 4 * i : 7 + 4 * i]
            shape = [d0, d1][:ndim]
            tensors.append(torch.empty(shape, dtype=_DTYPES[dtype_i], device=self.device))
        works = [dist.irecv(t, peer, group=self.group) for t in tensors]
        for w in works:
            w.wait()
        return Message(kind=h[0], tag=h[1], tensors=tensors)

    def _reap(self) -> None:
        keep = []
        for works, bufs in self._pending:
            if all(w.is_completed() for w in works):
                continue
            keep.append((works, bufs))
        self._pending = keep

    def flush(self) -> None:
        for works, _ in self._pending:
            for w in works:
                w.wait()
        self._pending.clear()


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")) or [0], dtype=torch.uint8)


def decode_text(t: torch.Tensor) -> str:
    return bytes(t.cpu().tolist()).decode("utf-8", errors="replace").rstrip("\x00")
