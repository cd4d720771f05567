"""CPU threads per process: the cores this process may use, shared by the ranks on its machine.

Left alone, torch starts one thread per core in every process, and its OpenMP threads spin while
they wait for one another; on a machine that is busy (other jobs, or several ranks each with all
the cores) a thread that lost its core stalls the rest: on a shared 2-core machine the
one-process demo batch job ran 5-8x slower than with one thread, the fine-tune 7x or worse.
torchrun sets OMP_NUM_THREADS=1 only for `--nproc_per_node>1`.

So when OMP_NUM_THREADS is unset, entry points (`configure_threads()`, before torch starts its
pool) use the cores of this process's CPU affinity divided by the ranks on this machine, and let
waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, unless set): on a shared 2-core machine that made
two threads as fast as one on the demo model and the fine-tune 10% faster, instead of 15-30x
slower. An OMP_NUM_THREADS the user set is kept, with everything else. A CPU quota without a
cpuset (`docker --cpus`) is not visible in the affinity: set OMP_NUM_THREADS there.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

_chosen: Optional[str] = None  # the start-up line describing what configure_threads did


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups cpusets, SLURM's binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def local_processes(environ: Mapping[str, str] = os.environ) -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE (1 without torchrun)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def per_process(n_local: int, cores: Optional[int] = None) -> int:
    """Threads for each of `n_local` processes sharing `cores` (default: this process's cores)."""
    return max(1, (cores if cores is not None else available_cores()) // max(1, n_local))


def configure_threads() -> str:
    """Set OMP_NUM_THREADS and OMP_WAIT_POLICY unless the user set OMP_NUM_THREADS. Call it before
    torch is imported: the OpenMP runtime reads both once, when it loads.

    Returns the start-up line saying what was chosen and why; `startup_line()` returns it later."""
    global _chosen
    env = os.environ
    n_local = local_processes(env)
    given = env.get("OMP_NUM_THREADS")
    if given:
        _chosen = f"threads: {given} per process (OMP_NUM_THREADS={given} from the environment"
        share = per_process(n_local)
        if given == "1" and "TORCHELASTIC_RUN_ID" in env and n_local > 1 and share > 1:
            _chosen += f"; torchrun sets 1 when it is unset: export OMP_NUM_THREADS={share} before torchrun to use every core"
        _chosen += ")"
        return _chosen
    cores = available_cores()
    n = per_process(n_local, cores)
    env["OMP_NUM_THREADS"] = str(n)  # also inherited by any child process
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _chosen = (f"threads: {n} per process ({cores} core(s) available / {n_local} process(es) on this machine, "
               f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; set OMP_NUM_THREADS to choose)")
    return _chosen


def host_compute_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Threads for host-bound work a rank does alone (DeepSpeed's CPU Adam step): torch's current count,
    except under torchrun's own OMP_NUM_THREADS=1 (set when the user set nothing), where one core
    would do the work of this rank's whole share (a 7B stage's step took 14 s instead of 2 s)."""
    import torch

    if environ.get("OMP_NUM_THREADS") == "1" and "TORCHELASTIC_RUN_ID" in environ:
        return per_process(local_processes(environ))
    return torch.get_num_threads()


def startup_line() -> str:
    """What configure_threads chose; when it was not called (library use), torch's current count."""
    if _chosen is not None:
        return _chosen
    import torch

    return f"threads: {torch.get_num_threads()} per process"
