"""Run a function on N CPU ranks (gloo) and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp


@contextmanager
def one_thread():
    """In-process runs: one intra-op thread (steadier on a shared machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_one_thread(fn, *args):
    """`fn(*args)` under `one_thread()`."""
    with one_thread():
        return fn(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> None:
    """What torchrun would set for this rank of a one-machine job on 127.0.0.1:port."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    rank_environment(rank, world, port)
    try:
        result = fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
        return  # no teardown: a peer may be gone, and the parent kills what is left
    from pp_runtime.distributed.parallel import shutdown

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


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc): torchrun's workers, which run in their own sessions."""
    import pathlib

    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie or a vanished pid counts as gone)."""
    import pathlib

    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs; returns those still running after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    import signal

    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
