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


# ------------------------------------------------------------------------------ generation pipeline
TABLE_COLS = 9  # columns of a step table row (see pp_runtime.step_table)


@dataclass
class PipeGroups:
    """The process groups one stage of a generation pipeline talks through.

    Step tables travel on a CPU (gloo) control plane, so a stage learns what comes next without
    waiting for its GPU. Activations travel on one group per direction of each edge: every NCCL
    communicator has its own stream, so a receive posted early from one neighbour never queues a
    send to the other behind it (NCCL would serialise them on one communicator)."""

    control: Optional[dist.ProcessGroup]  # gloo, this replica's stages
    from_prev: Optional[dist.ProcessGroup]  # edge (prev, me)
    to_next: Optional[dist.ProcessGroup]  # edge (me, next)
    results: Optional[dist.ProcessGroup]  # (last, first): sampled tokens come back on it


def make_pipe_groups(pp_ranks_of_replicas: Sequence[Sequence[int]], my_rank: int) -> PipeGroups:
    """Collective: every rank of the world calls it with the same replica layout, in the same order."""
    mine = PipeGroups(None, None, None, None)
    for ranks in pp_ranks_of_replicas:
        ranks = list(ranks)
        control = dist.new_group(ranks, backend="gloo")
        edges = [dist.new_group([ranks[i], ranks[i + 1]]) for i in range(len(ranks) - 1)]
        results = dist.new_group([ranks[0], ranks[-1]]) if len(ranks) > 1 else None
        if my_rank in ranks:
            i = ranks.index(my_rank)
            mine = PipeGroups(control, edges[i - 1] if i > 0 else None, edges[i] if i < len(ranks) - 1 else None,
                              results)
    return mine


class StageChannels:
    """Point-to-point traffic of one generation stage, every op posted as a batched P2P op.

    Sends return at once; their buffers are kept until the op completes. A receive returns its work
    handle: waiting on it makes the compute stream wait (on GPU), not the host."""

    def __init__(self, groups: PipeGroups, prev: Optional[int], next_: Optional[int], first: int, last: int,
                 table_rows: int) -> None:
        self.groups, self.prev, self.next, self.first, self.last = groups, prev, next_, first, last
        self.table_rows = table_rows
        self._pending: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

    def _post(self, ops: list[dist.P2POp], keep: list[torch.Tensor]) -> list[dist.Work]:
        works = dist.batch_isend_irecv(ops)
        self._pending.append((works, keep))
        self._reap()
        return works

    # control plane (CPU)
    def send_table(self, table: torch.Tensor, text: Optional[torch.Tensor] = None) -> None:
        assert self.next is not None and table.shape == (self.table_rows, TABLE_COLS)
        ops = [dist.P2POp(dist.isend, table, self.next, self.groups.control)]
        if text is not None:
            ops.append(dist.P2POp(dist.isend, text, self.next, self.groups.control))
        self._post(ops, [table] + ([text] if text is not None else []))

    def recv_table(self) -> torch.Tensor:
        assert self.prev is not None
        table = torch.empty((self.table_rows, TABLE_COLS), dtype=torch.int64)
        dist.recv(table, self.prev, group=self.groups.control)
        return table

    def recv_text(self, n_bytes: int) -> torch.Tensor:
        buf = torch.empty(n_bytes, dtype=torch.uint8)
        dist.recv(buf, self.prev, group=self.groups.control)
        return buf

    # data plane
    def send_activations(self, x: torch.Tensor) -> None:
        self._post([dist.P2POp(dist.isend, x, self.next, self.groups.to_next)], [x])

    def recv_activations(self, buf: torch.Tensor) -> dist.Work:
        return self._post([dist.P2POp(dist.irecv, buf, self.prev, self.groups.from_prev)], [buf])[0]

    def send_results(self, r: torch.Tensor) -> None:
        self._post([dist.P2POp(dist.isend, r, self.first, self.groups.results)], [r])

    def recv_results(self, buf: torch.Tensor) -> dist.Work:
        return self._post([dist.P2POp(dist.irecv, buf, self.last, self.groups.results)], [buf])[0]

    def _reap(self) -> None:
        self._pending = [(w, b) for w, b in self._pending if not all(x.is_completed() for x in w)]

    def flush(self) -> None:
        for works, _ in self._pending:
            for w in works:
                w.wait()
        self._pending.clear()
