"""Thin-entry-point support: turn user errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from pp_runtime.errors import PPRuntimeError


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on this rank and exits 2, a crash exits 1.

    Exits with os._exit so a rank whose peers are gone cannot hang in process-group teardown.
    """
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        code = main(sys.argv[1:]) or 0
    except PPRuntimeError as e:
        sys.stderr.write(f"{prefix}error: {e}\n")  # one write: ranks sharing a pipe cannot splice lines
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a crash must still end every rank
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
