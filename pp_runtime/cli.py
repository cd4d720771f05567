"""Thin-entry-point support: Hydra's command line, and user errors as one line on stderr with a
non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Callable

from pp_runtime.errors import PPRuntimeError
from pp_runtime.threads import configure_threads

if TYPE_CHECKING:
    from omegaconf import DictConfig


def hydra_main(job: str, run_job: Callable[["DictConfig"], int | None], sweeps: bool = False) -> None:
    """Run `run_job` under Hydra's full command line over `conf/<job>.yaml`: `--help`, `--cfg job`,
    `--config-dir`/`--config-name`, `+group=option`, and `--multirun` when `sweeps`.

    The command line is checked first (`config.check_command_line`), so a bad flag or override is
    one `error:` line and exit 2 rather than Hydra's own report. A failing job ends the process
    with its code (in a sweep, the remaining jobs do not run). Under torchrun every rank runs a
    sweep's jobs one after another, in the same order, each job on all ranks."""

    def main(argv: list[str]) -> int:
        import hydra

        from pp_runtime.config import CONF_DIR, check_command_line

        args = check_command_line(job, argv, sweeps)
        scratch = None
        if args.multirun and int(os.environ.get("RANK", "0")) > 0:
            # every rank runs the sweep; rank 0's Hydra makes the sweep's folders and rank 0 hands each
            # job's out_dir to the others (their clocks may name another second)
            scratch = tempfile.mkdtemp(prefix="pp_runtime_sweep_")
            sys.argv.append(f"hydra.sweep.dir={scratch}")

        def task(cfg: "DictConfig") -> None:
            code = guarded(lambda: run_job(cfg))
            if code:
                _exit(code)

        hydra.main(config_path=str(CONF_DIR), config_name=job, version_base="1.3")(task)()  # reads sys.argv
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0

    run_main(main)


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on this rank and exits 2, a crash exits 1.

    Threads are chosen first (before torch starts its pool). Exits with os._exit so a rank whose
    peers are gone cannot hang in process-group teardown.
    """
    configure_threads()
    _exit(guarded(lambda: main(sys.argv[1:])))


def guarded(fn: Callable[[], int | None]) -> int:
    """`fn()`'s exit code; a user error is one `error:` line (code 2), a crash a traceback (code 1)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        return fn() or 0
    except PPRuntimeError as e:
        sys.stderr.write(f"{prefix}error: {e}\n")  # one write: ranks sharing a pipe cannot splice lines
        _tell_torchrun(f"error: {e}")
        return 2
    except SystemExit as e:  # Hydra's --help and its own reports
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output went away (`... --help | head`)
        return 141
    except BaseException:  # noqa: BLE001 - a crash must still end every rank
        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `... --help | head`
        pass
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
