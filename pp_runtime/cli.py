"""Thin-entry-point support: turn user errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from pp_runtime import liveness
from pp_runtime.errors import PPRuntimeError

# what gloo / NCCL / the store say when a peer's connection went away with the peer
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on this rank and exits 2, a crash exits 1.

    Every exit tells the peers' watchdogs (pp_runtime.liveness) whether this rank left cleanly or
    failed, so they stop at once with one line naming it. An error caused by a peer that vanished is
    not reported as this rank's own: the watchdog names the rank that failed first instead. Exits with
    os._exit so a rank whose peers are gone cannot hang in process-group teardown."""
    prefix = liveness.rank_prefix()
    try:
        code = main(sys.argv[1:]) or 0
    except PPRuntimeError as e:
        liveness.record_failure(2, str(e))
        liveness.exit_now(2, f"{prefix}error: {e}")
    except KeyboardInterrupt:
        liveness.record_failure(130, "interrupted")
        liveness.exit_now(130)
    except BaseException as e:  # noqa: BLE001 - a crash must still end every rank
        watch = liveness.active()
        if watch is not None and _peer_lost(e):
            liveness.wait_for_verdict(watch.deadline + watch.interval + liveness.STORE_OP_S + watch.grace)
        summary = (str(e).strip().splitlines() or [""])[0][:300]
        liveness.record_failure(1, f"{type(e).__name__}: {summary}")
        liveness.exit_now(1, traceback.format_exc())
    if code == 0:
        liveness.stop()
    else:
        liveness.record_failure(code, f"exited with code {code}")
    liveness.exit_now(code)


def _peer_lost(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_LOST)
