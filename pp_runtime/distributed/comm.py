"""Point-to-point traffic between pipeline stages: every op a batched P2P op on its own group.

Each directed edge of a pipeline gets its own process group per kind of traffic (a lane): the
activations rank i sends rank j, the gradients j sends back to i, the sampled tokens the last
stage returns to the first. On GPU every NCCL communicator has its own stream, so a receive
posted early on one edge never holds up a send on another (one communicator would run them in
posting order). Messages of one lane of one edge are matched in posting order, so a receiver
posts its receives in the order its sender sends. NCCL on GPU, gloo on CPU, same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

KIND_DATA, KIND_STOP, KIND_ABORT = 0, 1, 2  # step-table kinds of the generation pipeline

ACT, GRAD, RESULTS = "act", "grad", "results"  # lanes: activations, their gradients, sampled tokens
Edge = tuple[int, int, str]  # (source rank, destination rank, lane)

_EDGE_GROUPS: dict[Edge, dist.ProcessGroup] = {}  # by global ranks, until `forget_groups`


def edge_groups(pp_ranks_of_replicas: Sequence[Sequence[int]], edges: Iterable[Edge]) -> dict[Edge, dist.ProcessGroup]:
    """The group of each directed edge (pipeline-rank source, destination, lane) of every replica,
    keyed by global ranks; a group is made once per process and shared by whoever asks for it.

    Collective the first time an edge is asked for: every rank of the world asks for the same
    edges, with the same replica layout, at the same point."""
    edges = sorted(set(edges))
    out = {}
    for ranks in pp_ranks_of_replicas:
        for src, dst, lane in edges:
            key = (ranks[src], ranks[dst], lane)
            if key not in _EDGE_GROUPS:
                members = sorted({ranks[src], ranks[dst]})
                _EDGE_GROUPS[key] = group = dist.new_group(members)
                if dist.get_rank() in members:
                    _open(group)
            out[key] = _EDGE_GROUPS[key]
    return out


def _open(group: dist.ProcessGroup) -> None:
    """Set up the pair's communicator and its point-to-point connections now, both members at the
    same point of the same order. NCCL connects a pair at its first send or receive, and the rank
    doing so waits on the host until its peer connects too: a receive posted early (ahead of need)
    would then block its host until the sender reaches that edge, while the sender may be waiting
    for this rank's next message. One send and one receive each way, batched, opens both
    directions."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    me = dist.get_rank()
    peer = next(r for r in dist.get_process_group_ranks(group) if r != me)
    out, inp = torch.zeros(1, device=device), torch.empty(1, device=device)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer, group), dist.P2POp(dist.irecv, inp, peer, group)])
    for w in works:
        w.wait()


def forget_groups() -> None:
    """Drop the edge groups (the process group they belong to is being destroyed)."""
    _EDGE_GROUPS.clear()


class BatchedP2P:
    """Posts ops with `batch_isend_irecv`. Sends return at once and keep their tensors alive until
    they have completed (`flush` waits for the rest). A receive returns its work handle, which
    its caller waits on exactly once before reading the buffer (on GPU that makes the compute
    stream wait, not the host; gloo's works hang on a second wait)."""

    def __init__(self) -> None:
        self._sending: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

    def _send(self, ops: list[dist.P2POp], keep: list[torch.Tensor]) -> None:
        self._sending.append((dist.batch_isend_irecv(ops), keep))
        self._sending = [(w, b) for w, b in self._sending if not all(x.is_completed() for x in w)]

    @staticmethod
    def _recv(op: dist.P2POp) -> dist.Work:
        return dist.batch_isend_irecv([op])[0]

    def flush(self) -> None:
        """Wait until every send has completed."""
        for works, _ in self._sending:
            for w in works:
                w.wait()
        self._sending.clear()


class EdgeLinks(BatchedP2P):
    """One pipeline rank's data plane for training: sends and receives by (peer, lane), each on
    its edge's group."""

    def __init__(self, my_rank: int, groups: Mapping[Edge, dist.ProcessGroup]) -> None:
        super().__init__()
        self.rank, self.groups = my_rank, groups

    def send(self, tensor: torch.Tensor, dst: int, lane: str) -> None:
        """Asynchronous send to global rank `dst`."""
        self._send([dist.P2POp(dist.isend, tensor, dst, self.groups[self.rank, dst, lane])], [tensor])

    def recv(self, buf: torch.Tensor, src: int, lane: str) -> dist.Work:
        """Post a receive from global rank `src` into `buf`; wait on the returned work before reading it."""
        return self._recv(dist.P2POp(dist.irecv, buf, src, self.groups[src, self.rank, lane]))


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")) or [0], dtype=torch.uint8)


def decode_text(t: torch.Tensor) -> str:
    return bytes(t.cpu().tolist()).decode("utf-8", errors="replace").rstrip("\x00")


# ------------------------------------------------------------------------------ generation pipeline
TABLE_COLS = 9  # columns of a step table row (see pp_runtime.inference.step_table)


@dataclass
class PipeGroups:
    """The process groups one stage of a generation pipeline talks through.

    Step tables travel on a CPU (gloo) control plane, so a stage learns what comes next without
    waiting for its GPU. Activations travel on one group per direction of each edge: every NCCL
    communicator has its own stream, so a receive posted early from one neighbour never queues a
    send to the other behind it (NCCL would serialise them on one communicator)."""

    control: Optional[dist.ProcessGroup]  # gloo, this replica's stages
    from_prev: Optional[dist.ProcessGroup]  # edge (prev, me), lane ACT
    to_next: Optional[dist.ProcessGroup]  # edge (me, next), lane ACT
    results: Optional[dist.ProcessGroup]  # edge (last, first), lane RESULTS: sampled tokens come back on it


def make_pipe_groups(pp_ranks_of_replicas: Sequence[Sequence[int]], my_rank: int) -> PipeGroups:
    """Collective: every rank of the world calls it with the same replica layout, in the same order."""
    controls = [dist.new_group(list(ranks), backend="gloo") for ranks in pp_ranks_of_replicas]
    n = len(pp_ranks_of_replicas[0])
    edges = [(i, i + 1, ACT) for i in range(n - 1)] + ([(n - 1, 0, RESULTS)] if n > 1 else [])
    groups = edge_groups(pp_ranks_of_replicas, edges)
    for control, ranks in zip(controls, pp_ranks_of_replicas):
        ranks = list(ranks)
        if my_rank in ranks:
            i = ranks.index(my_rank)
            return PipeGroups(
                control,
                groups[ranks[i - 1], my_rank, ACT] if i > 0 else None,
                groups[my_rank, ranks[i + 1], ACT] if i < n - 1 else None,
                groups[ranks[-1], ranks[0], RESULTS] if n > 1 else None,
            )
    return PipeGroups(None, None, None, None)


class StageChannels(BatchedP2P):
    """Point-to-point traffic of one generation stage: step tables on the CPU control plane,
    activations and results on their edges' groups."""

    def __init__(self, groups: PipeGroups, prev: Optional[int], next_: Optional[int], first: int, last: int,
                 table_rows: int) -> None:
        super().__init__()
        self.groups, self.prev, self.next, self.first, self.last = groups, prev, next_, first, last
        self.table_rows = table_rows

    # control plane (CPU)
    def send_table(self, table: torch.Tensor, text: Optional[torch.Tensor] = None) -> None:
        assert self.next is not None and table.shape == (self.table_rows, TABLE_COLS)
        ops = [dist.P2POp(dist.isend, table, self.next, self.groups.control)]
        if text is not None:
            ops.append(dist.P2POp(dist.isend, text, self.next, self.groups.control))
        self._send(ops, [table] + ([text] if text is not None else []))

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
        self._send([dist.P2POp(dist.isend, x, self.next, self.groups.to_next)], [x])

    def recv_activations(self, buf: torch.Tensor) -> dist.Work:
        return self._recv(dist.P2POp(dist.irecv, buf, self.prev, self.groups.from_prev))

    def send_results(self, r: torch.Tensor) -> None:
        self._send([dist.P2POp(dist.isend, r, self.first, self.groups.results)], [r])

    def recv_results(self, buf: torch.Tensor) -> dist.Work:
        return self._recv(dist.P2POp(dist.irecv, buf, self.last, self.groups.results))
