"""Run a function on N CPU ranks (gloo) and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
        return  # no teardown: a peer may be gone, and the parent kills what is left
    from pp_runtime.parallel import shutdown

    shutdown()
    queue.put((rank, "ok", result))


def run_ranks(world: int, fn, *args, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
