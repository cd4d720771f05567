"""Process groups: world = data-parallel replicas x pipeline stages, as a DeviceMesh."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist

from pp_runtime import errors

from pp_runtime.distributed import comm

from pp_runtime.distributed import liveness
from pp_runtime.errors import ConfigError, PPRuntimeError

T = TypeVar("T")


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_size: int = 1
    pp_size: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this replica's pipeline, stage order
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev(self) -> int:
        return self.pp_ranks[self.pp_rank - 1]

    @property
    def next(self) -> int:
        return self.pp_ranks[self.pp_rank + 1]

    @property
    def first(self) -> int:
        return self.pp_ranks[0]

    @property
    def last(self) -> int:
        return self.pp_ranks[-1]


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no GPU is visible; use device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda")
    return torch.device("cpu")


def init_parallel(stages: Optional[int] = None, data_parallel: int = 1, device: str = "auto",
                  timeout_s: float = 600.0) -> ParallelContext:
    """Start torch.distributed from torchrun's environment (or run as one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if data_parallel < 1:
        raise ConfigError(f"pipeline.data_parallel={data_parallel} must be at least 1")
    pp = stages if stages else world // data_parallel
    if pp < 1 or pp * data_parallel != world:
        problem = (f"pipeline.stages={stages} x pipeline.data_parallel={data_parallel} must equal" if stages
                   else f"pipeline.data_parallel={data_parallel} must divide")
        raise ConfigError(f"{problem} the number of processes ({world}); change them or --nproc_per_node / --nnodes")
    if world == 1:
        return ParallelContext(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    liveness.start(rank, world)  # a peer that dies or freezes now ends every rank within a bound
    mesh = init_device_mesh(dev.type, (data_parallel, pp), mesh_dim_names=("dp", "pp"))
    pp_group, dp_group = mesh.get_group("pp"), mesh.get_group("dp")
    dp_rank, pp_rank = rank // pp, rank % pp
    return ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank, device=dev,
        dp_size=data_parallel, pp_size=pp, dp_rank=dp_rank, pp_rank=pp_rank,
        pp_ranks=tuple(dp_rank * pp + i for i in range(pp)),
        pp_group=pp_group, dp_group=dp_group,
    )


_PIPE_GROUPS: dict[tuple[int, int], comm.PipeGroups] = {}  # (dp, pp) -> this rank's PipeGroups, until shutdown


def replica_ranks(ctx: ParallelContext) -> list[list[int]]:
    """Global ranks of every replica's pipeline, in stage order."""
    return [[d * ctx.pp_size + i for i in range(ctx.pp_size)] for d in range(ctx.dp_size)]


def edge_groups(ctx: ParallelContext, edges: Iterable[comm.Edge]) -> dict[comm.Edge, dist.ProcessGroup]:
    """The groups of the directed pipeline edges `edges` ((source, destination, lane) in pipeline
    ranks) of every replica, keyed by global ranks (pp_runtime.distributed.comm.edge_groups); collective the
    first time an edge is asked for."""
    return comm.edge_groups(replica_ranks(ctx), edges)


def pipe_groups(ctx: ParallelContext) -> comm.PipeGroups:
    """The generation pipeline's groups (pp_runtime.distributed.comm.PipeGroups), made once per process group
    layout; collective the first time (every rank of the world calls it at the same point)."""
    key = (ctx.dp_size, ctx.pp_size)
    if key not in _PIPE_GROUPS:
        _PIPE_GROUPS[key] = comm.make_pipe_groups(replica_ranks(ctx), ctx.rank)
    return _PIPE_GROUPS[key]


def shutdown() -> None:
    """Tear down the process groups once every rank got here.

    The barrier matters: a gloo rank that destroys its group while a peer is still finishing its
    last collective can abort the process ("terminate called without an active exception")."""
    _PIPE_GROUPS.clear()
    comm.forget_groups()
    if dist.is_initialized():
        dist.barrier()
        liveness.stop()
        dist.destroy_process_group()


def agree(ctx: ParallelContext, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it fails anywhere, fail everywhere with that rank's message.

    For set-up steps that can fail on some ranks only (a tokenizer only the first stage reads, a
    tensor missing from one stage's shard): without it the healthy ranks would wait in their first
    communication for a peer that has already exited."""
    result: Optional[T] = None
    err: Optional[BaseException] = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        err = e
    if ctx.distributed:
        mine = None if err is None else (type(err).__name__, str(err), isinstance(err, PPRuntimeError))
        notes: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(notes, mine)
        failed = [(r, n) for r, n in enumerate(notes) if n is not None]
        if failed and err is None:
            r, (cls_name, msg, user) = failed[0]
            if user:
                raise getattr(errors, cls_name, PPRuntimeError)(msg)
            raise RuntimeError(f"rank {r} failed during setup: {cls_name}: {msg}")
    if err is not None:
        raise err
    return result  # type: ignore[return-value]
