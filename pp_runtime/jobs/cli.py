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

from pp_runtime.distributed import liveness
from pp_runtime.distributed.threads import configure_threads
from pp_runtime.errors import PPRuntimeError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def hydra_main(job: str, run_job: Callable[["DictConfig"], int | None], sweeps: bool = False,
               cuda_alloc_conf: str | None = None) -> None:
    """Run `run_job` under Hydra's full command line over `conf/<job>.yaml`: `--help`, `--cfg job`,
    `--config-dir`/`--config-name`, `+group=option`, and `--multirun` when `sweeps`.

    The command line is checked first (`config.check_command_line`), so a bad flag or override is
    one `error:` line and exit 2 rather than Hydra's own report. A failing job ends the process
    with its code (in a sweep, the remaining jobs do not run). Under torchrun every rank runs a
    sweep's jobs one after another, in the same order, each job on all ranks.

    `cuda_alloc_conf` becomes PYTORCH_CUDA_ALLOC_CONF unless the user set it (read at the first CUDA
    allocation, so setting it here is early enough)."""
    if cuda_alloc_conf:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cuda_alloc_conf)

    def main(argv: list[str]) -> int:
        import hydra

        from pp_runtime.jobs.config import CONF_DIR, check_command_line, register_schemas

        register_schemas()
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


# what gloo / NCCL / the store say when a peer's connection went away with the peer
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on this rank and exits 2, a crash exits 1.

    Threads are chosen first (before torch starts its pool). Every exit tells the peers' watchdogs
    (pp_runtime.distributed.liveness) whether this rank left cleanly or failed, so they stop at once with one line
    naming it; os._exit means a rank whose peers are gone cannot hang in process-group teardown."""
    configure_threads()
    _exit(guarded(lambda: main(sys.argv[1:])))


def guarded(fn: Callable[[], int | None]) -> int:
    """`fn()`'s exit code, or Hydra's (`--help`). A user error (one `error:` line, code 2) or a crash
    (a traceback, code 1) ends the process here. An error caused by a peer that vanished is not
    reported as this rank's own: the watchdog names the rank that failed first instead."""
    prefix = liveness.rank_prefix()
    try:
        return fn() or 0
    except PPRuntimeError as e:
        liveness.record_failure(2, str(e))
        _tell_torchrun(f"error: {e}")
        liveness.exit_now(2, f"{prefix}error: {e}")
    except SystemExit as e:  # Hydra's --help and its own reports
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        liveness.record_failure(130, "interrupted")
        liveness.exit_now(130)
    except BrokenPipeError:  # the reader of our output went away (`... --help | head`)
        return 141
    except BaseException as e:  # noqa: BLE001 - a crash must still end every rank
        watch = liveness.active()
        if watch is not None and _peer_lost(e):
            liveness.wait_for_verdict(watch.deadline + watch.interval + liveness.STORE_OP_S + watch.grace)
        summary = (str(e).strip().splitlines() or [""])[0][:300]
        liveness.record_failure(1, f"{type(e).__name__}: {summary}")
        liveness.exit_now(1, traceback.format_exc())
    return 1  # not reached: exit_now ends the process


def _exit(code: int) -> None:
    if code == 0:
        liveness.stop()
    else:
        liveness.record_failure(code, f"exited with code {code}")
    liveness.exit_now(code)


def _peer_lost(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_LOST)


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
