"""Progress of `launch/infer.py` over every replica: a bar on a terminal, plain lines in a log.

Each replica's first stage counts its finished prompts; the other replicas publish their counts
in the job's c10d store (the rendezvous key-value store, no collective) about once a second.
Rank 0 reads them from a background thread, so lines keep coming while its own replica is done
and waits for the others.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO

from pp_runtime.distributed.parallel import ParallelContext

_KEY = "pp_runtime/infer/done"
_PUBLISH_EVERY_S = 1.0


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class InferProgress:
    """`finished()` after each completed prompt on a first stage; `close()` on every rank at the end."""

    def __init__(self, ctx: ParallelContext, total: Optional[int], enabled: bool, interval: float,
                 stream: Optional[TextIO] = None) -> None:
        self.ctx, self.total = ctx, total
        self.stream = stream or sys.stderr
        self.interval = max(float(interval), 0.1)
        self.mine = 0  # prompts this replica finished
        self._published, self._last_publish = 0, time.monotonic()
        self._store = None
        if enabled and ctx.distributed and ctx.dp_size > 1:
            import torch.distributed as dist

            self._store = dist.distributed_c10d._get_default_store()
        self._reporting = enabled and ctx.rank == 0
        self._stop = threading.Event()
        self._bar = self._thread = None
        self.t0 = time.perf_counter()
        if self._reporting:
            if self.stream.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc="prompts", unit=" prompts", file=self.stream)
            self._thread = threading.Thread(target=self._report, name="infer-progress", daemon=True)
            self._thread.start()

    def finished(self) -> None:
        self.mine += 1
        if self._store is not None and self.ctx.rank != 0 and time.monotonic() - self._last_publish >= _PUBLISH_EVERY_S:
            self._publish()

    def _publish(self) -> None:
        self._store.add(_KEY, self.mine - self._published)
        self._published, self._last_publish = self.mine, time.monotonic()

    def done(self) -> int:
        """Prompts finished over all replicas (rank 0; the others' counts lag by up to a second)."""
        others = self._store.add(_KEY, 0) if self._store is not None else 0
        return self.mine + others

    def line(self, n: int, elapsed: float) -> str:
        rate = n / max(elapsed, 1e-9)
        of = ""
        if self.total:
            eta = _fmt_s((self.total - n) / rate) if rate > 0 else "?"
            of = f"/{self.total} ({100.0 * n / self.total:.1f}%)"
        else:
            eta = ""
        return (f"progress: {n}{of} prompts | {rate:,.2f} prompts/s | elapsed {_fmt_s(elapsed)}"
                + (f" | ETA {eta}" if eta else ""))

    def _report(self) -> None:
        period = 0.5 if self._bar is not None else self.interval
        while not self._stop.wait(period):
            self._show(self.done())

    def _show(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n - self._bar.n)
        else:
            print(self.line(n, time.perf_counter() - self.t0), file=self.stream, flush=True)

    def close(self) -> None:
        """Publish the last count; rank 0 (after every other rank closed) stops its reporter and
        shows the final count."""
        if self._store is not None and self.ctx.rank != 0 and self.mine != self._published:
            self._publish()
        if not self._reporting:
            return
        self._stop.set()
        self._thread.join()
        self._show(self.done())
        if self._bar is not None:
            self._bar.close()
