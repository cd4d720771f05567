"""`train.optimizer=cpu_adam`: float32 master weights and AdamW states in host memory, updated by
DeepSpeed's `DeepSpeedCPUAdam` (its C++ / AVX kernel, built just in time on first use).

The device keeps only the model-dtype weights and gradients. The slice an optimizer owns (the
whole stage, or its ZeRO-1 shard: pp_runtime/training/optim_sharding.py) is stepped in chunks so that the
copies overlap with the host's arithmetic:

    device -> host   gradients of chunk i+1 (a side stream, into pinned memory, non_blocking)
    host             float32 copy of chunk i's gradient, clip, DeepSpeedCPUAdam on chunk i
    host -> device   chunk i-1's updated weights, cast to the model dtype in pinned memory
                     (a second side stream, non_blocking)

The compute stream waits for the last upload before the next step's forward (or, under ZeRO, the
all-gather of the updated slices) reads the weights. On a CPU-only machine the same code runs
without streams, which is what the CPU tests exercise.

Host memory per parameter of the slice: 12 bytes (master, exp_avg, exp_avg_sq) + 2 (pinned
model-dtype transfer buffer, GPU only) + one chunk of float32 gradient scratch.

Under torchrun's default OMP_NUM_THREADS=1 the host step runs on this process's share of the cores
(cores / ranks on the machine; `threads.host_compute_threads`): on one core a 7B stage's step took
14 s on 2 H200s, on its 8 cores 2 s. The op shares torch's OpenMP runtime, so `torch.set_num_threads`
governs its parallel loops; the previous count is restored after the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pp_runtime.distributed.threads import host_compute_threads
from pp_runtime.errors import ConfigError

if TYPE_CHECKING:
    from pp_runtime.training.optim_sharding import FlatAdamW

INSTALL = ("pip install 'pp_runtime[deepspeed]' (DS_BUILD_OPS=0 is enough: the CPU Adam op builds just in time "
           "on first use, which needs a C++ compiler such as g++ and ninja)")


def cpu_adam_class() -> type:
    """DeepSpeedCPUAdam with its op loaded (built on first use), or a one-line ConfigError saying why not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # noqa: BLE001 - ImportError, or deepspeed failing its own import
        raise ConfigError(f"train.optimizer=cpu_adam needs DeepSpeed, which does not import here "
                          f"({type(e).__name__}: {_first_line(e)}); {INSTALL}") from None
    try:
        CPUAdamBuilder().load()
    except Exception as e:  # noqa: BLE001 - a failed compile raises all sorts
        raise ConfigError(f"train.optimizer=cpu_adam: DeepSpeed's CPU Adam op could not be built or loaded "
                          f"({type(e).__name__}: {_first_line(e)}); {INSTALL}") from None
    return DeepSpeedCPUAdam


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no message"


class HostStepper:
    """Runs FlatAdamW's step on the host, chunk by chunk, overlapping the copies on GPU."""

    def __init__(self, flat: "FlatAdamW") -> None:
        self.f = flat
        self.cuda = flat.device.type == "cuda"
        S = flat.layout.shard_numel
        longest = max((hi - lo for lo, hi, _, _ in flat.views), default=1)
        self.scratch = torch.empty(longest, dtype=torch.float32, pin_memory=False)  # float32 gradient of one chunk
        self.threads = host_compute_threads()
        if self.cuda:
            self.lp = torch.empty(S, dtype=flat.model_dtype, pin_memory=True)  # gradients down, weights up
            self.new = torch.empty(S, dtype=flat.model_dtype, device=flat.device)
            self.down = torch.cuda.Stream(flat.device)
            self.up = torch.cuda.Stream(flat.device)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Update the host slice; returns the updated slice in the model dtype on the device."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._step()
        finally:
            torch.set_num_threads(before)

    def _step(self) -> torch.Tensor:
        f = self.f
        g = f._grad_lp
        events = [None] * len(f.views)
        if self.cuda:
            ready = torch.cuda.current_stream(f.device).record_event()
            with torch.cuda.stream(self.down):
                self.down.wait_event(ready)
                for i, (lo, hi, _, _) in enumerate(f.views):
                    self.lp[lo:hi].copy_(g[lo:hi], non_blocking=True)
                    events[i] = self.down.record_event()
            g.record_stream(self.down)
            host_g = self.lp
        else:
            host_g = g
        for i, (lo, hi, _, p) in enumerate(f.views):
            if events[i] is not None:
                events[i].synchronize()
            gch = self.scratch[:hi - lo]
            gch.copy_(host_g[lo:hi])
            if f.clip_coef != 1.0:
                gch.mul_(f.clip_coef)
            p.grad = gch
            f.optimizer.step()  # DeepSpeedCPUAdam skips the views without a gradient: this chunk only
            p.grad = None
            if self.cuda:
                self.lp[lo:hi].copy_(p.detach())  # float32 -> model dtype, in pinned memory
                with torch.cuda.stream(self.up):
                    self.new[lo:hi].copy_(self.lp[lo:hi], non_blocking=True)
        if self.cuda:
            torch.cuda.current_stream(f.device).wait_stream(self.up)
            return self.new
        return f.master if f.model_dtype == f.opt_dtype else f.master.to(f.model_dtype)
