"""Peer liveness: a rank that dies, freezes or fails makes every other rank exit within a bound.

Each rank runs one daemon thread that, every `interval` seconds, bumps its heartbeat counter in the
rendezvous store (the TCPStore torchrun's agent, or rank 0 without torchrun, holds for the process
group) and reads every peer's counter in one round trip. It ends this process with `os._exit` and
one line on stderr when:

- a peer recorded a failure (its error, or a crash): exit with that peer's code, naming it;
- a peer's counter has not moved for `deadline` seconds (killed, SIGSTOPped, its node lost): exit 3;
- the store has not answered for `deadline` seconds (the launcher or node holding it is gone): exit 3;
- the launcher that started this worker (torchrun) is gone: exit 3.

Bound: a peer that dies or freezes is noticed within `deadline + interval + STORE_OP_S` seconds
(25 + 1 + 2 = 28 s by default; `PP_RUNTIME_PEER_TIMEOUT=SECONDS` changes the deadline); a recorded
failure within `interval + grace` (3 s). Heartbeats come from the thread, not from the compute loop,
so a long step never looks like a dead rank; a rank that leaves cleanly writes "exit" instead of a
counter, so peers that finish later do not wait for it. The same store works under one torchrun,
one torchrun per node (`--nnodes`) and SLURM (a torchrun per node); no extra port is opened.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported late: entry points choose CPU threads before it loads
    import torch.distributed as dist

DEADLINE_ENV = "PP_RUNTIME_PEER_TIMEOUT"
DEFAULT_DEADLINE_S = 25.0
STORE_OP_S = 2.0  # one store call may take this long before it counts as a missed contact
PEER_GONE_EXIT = 3  # exit code when another rank, the store or the launcher is gone
_FIRST_FAILURE = "first_failure"  # "rank|exit code|message" of the job's first failure, set once

_EXIT_LOCK = threading.Lock()  # the main thread and the watchdog: only one of them writes the last line
_WATCH: Optional["Watchdog"] = None


def deadline_s() -> float:
    raw = os.environ.get(DEADLINE_ENV)
    if raw is None:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        from pp_runtime.errors import ConfigError

        raise ConfigError(f"{DEADLINE_ENV}={raw!r} must be a positive number of seconds")
    return value


def rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def exit_now(code: int, line: Optional[str] = None) -> None:
    """Write `line` (one write, so ranks sharing a pipe cannot splice it) and end the process; the first
    caller wins, a second one (the watchdog racing the main thread) never gets to write."""
    with _EXIT_LOCK:
        if line is not None:
            try:
                sys.stderr.write(line if line.endswith("\n") else line + "\n")
            except OSError:
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # the reader went away (`... --help | head`)
                pass
        os._exit(code)


class Watchdog:
    """The heartbeat and the peer check of one rank (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, deadline: float) -> None:
        self.rank, self.world_size, self.deadline = rank, world_size, deadline
        self.interval = min(1.0, deadline / 8)
        self.grace = min(2.0, deadline / 4)  # lets a failing peer's own message come first on every rank
        self.store = store
        self._keys = [f"hb/{r}" for r in range(world_size)]  # a counter, then "exit" or "failed"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pp-liveness", daemon=True)
        launched_by_agent = "TORCHELASTIC_RUN_ID" in os.environ
        self._parent = os.getppid() if launched_by_agent else None

    def start(self) -> None:
        self.store.add(self._keys[self.rank], 1)
        self._thread.start()

    def stop(self, status: str = "exit") -> None:
        """Stop watching and tell the peers this rank left ("exit") or failed ("failed")."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=STORE_OP_S + self.interval)
        try:
            self.store.set(self._keys[self.rank], status)
        except Exception:  # noqa: BLE001 - the store may be gone already; nothing to tell then
            pass

    def record_failure(self, code: int, message: str) -> None:
        """Make this rank's failure the job's first one unless another rank's already is."""
        try:
            self.store.compare_set(_FIRST_FAILURE, "", f"{self.rank}|{code}|{message}")
        except Exception:  # noqa: BLE001
            pass
        self.stop("failed")

    def first_failure(self) -> Optional[tuple[int, int, str]]:
        try:
            if not self.store.check([_FIRST_FAILURE]):
                return None
            rank, code, msg = self.store.get(_FIRST_FAILURE).decode(errors="replace").split("|", 2)
            return int(rank), int(code), msg
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        started = last_contact = time.monotonic()
        seen: dict[int, tuple[bytes, float]] = {}
        ready = False
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self._parent is not None and os.getppid() != self._parent:
                self._fire(PEER_GONE_EXIT, f"the launcher that started this rank (pid {self._parent}) is gone; stopping")
            try:
                if self._stop.is_set():  # stop() is about to write "exit"/"failed": no counter after it
                    break
                self.store.add(self._keys[self.rank], 1)
                ready = ready or self.store.check(self._keys)
                values = self.store.multi_get(self._keys) if ready else []
                last_contact = now
            except Exception:  # noqa: BLE001 - unreachable or frozen store: judged below by the deadline
                values = []
            if now - last_contact > self.deadline:
                self._fire(PEER_GONE_EXIT, f"lost contact with the rendezvous store for {now - last_contact:.0f}s "
                                           "(the launcher or node holding it is gone); stopping")
            if not ready and now - started > self.deadline:
                self._fire(PEER_GONE_EXIT, f"not every rank reported a heartbeat within {self.deadline:.0f}s; stopping")
            for peer, value in enumerate(values):
                if peer == self.rank:
                    continue
                if value == b"failed":
                    self._peer_failed(peer)
                if value == b"exit":
                    continue
                prev = seen.get(peer)
                if prev is None or prev[0] != value:
                    seen[peer] = (value, now)
                elif now - prev[1] > self.deadline:
                    self._fire(PEER_GONE_EXIT, f"rank {peer} stopped responding (no heartbeat for {now - prev[1]:.0f}s: "
                                               "killed, frozen or its node is gone); stopping")

    def _peer_failed(self, peer: int) -> None:
        if self._stop.wait(self.grace):
            return
        first = self.first_failure()
        if first is None:
            self._fire(PEER_GONE_EXIT, f"rank {peer} failed; stopping")
        rank, code, msg = first
        self._fire(code, f"rank {rank} failed first: {msg}")

    def _fire(self, code: int, message: str) -> None:
        if self._stop.is_set():  # the main thread is leaving on its own: its verdict stands
            return
        exit_now(code, f"{rank_prefix()}error: {message}")


# ---------------------------------------------------------------------------------- process-wide
def start(rank: int, world_size: int) -> None:
    """Watch the peers of this process group (called once, right after init_process_group)."""
    global _WATCH
    if _WATCH is not None or world_size < 2:
        return
    deadline = deadline_s()
    _WATCH = Watchdog(scoped_store("liveness", timeout_s=STORE_OP_S), rank, world_size, deadline)
    _WATCH.start()


def scoped_store(name: str, timeout_s: Optional[float] = None) -> dist.Store:
    """Its own connection to the process group's rendezvous store (safe beside the main thread), with
    keys under `name/` of this launch, so a torchrun restart does not read the last attempt's keys."""
    import torch.distributed as dist

    base = dist.distributed_c10d._get_default_store().clone()
    if timeout_s is not None:
        base.set_timeout(timedelta(seconds=timeout_s))
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"pp_runtime/{run}/{name}/", base)


def active() -> Optional[Watchdog]:
    return _WATCH


def stop() -> None:
    """A clean exit: stop watching and tell the peers not to wait for this rank."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop("exit")
        _WATCH = None


def record_failure(code: int, message: str) -> None:
    global _WATCH
    if _WATCH is not None:
        _WATCH.record_failure(code, message)
        _WATCH = None


def wait_for_verdict(timeout: float) -> None:
    """A communication error (a peer's socket closed): give the watchdog time to name the rank that
    failed first, which ends the process with one line; returns if it never does."""
    if _WATCH is None:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.1)
