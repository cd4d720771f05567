"""Thin-entry-point support: turn user errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable

from pp_runtime.errors import PPRuntimeError
from pp_runtime.threads import configure_threads


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on this rank and exits 2, a crash exits 1.

    Threads are chosen first (before torch starts its pool). Exits with os._exit so a rank whose
    peers are gone cannot hang in process-group teardown.
    """
    configure_threads()
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        code = main(sys.argv[1:]) or 0
    except PPRuntimeError as e:
        sys.stderr.write(f"{prefix}error: {e}\n")  # one write: ranks sharing a pipe cannot splice lines
        _tell_torchrun(f"error: {e}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a crash must still end every rank
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, leave the message where its failure summary looks for the root cause, so the
    summary ends with our one line instead of "To enable traceback see: ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the summary then falls back to torchrun's own text
