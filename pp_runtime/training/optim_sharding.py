"""ZeRO-1 across data-parallel replicas, and the flat AdamW step it shares with CPU offload.

`train.zero=1` (with `pipeline.data_parallel` > 1): every replica of a stage keeps only 1/dp of the
optimizer's float32 master weights and AdamW states. Per step:

1. the stage's gradients are laid out in one flat buffer and **reduce-scattered** over the stage's
   data-parallel group: each replica receives the summed gradient of its own slice only;
2. the global gradient norm is the square root of the all-reduced sum of every rank's squared
   slice norm (slices are disjoint over replicas and stages, so this is the exact norm of the
   whole model's gradient), and each slice is clipped by it;
3. AdamW updates the slice (one call on at most two contiguous tensors: decayed matrices, then
   undecayed norms; one fused kernel on GPU);
4. the updated slice, cast to the model dtype, is **all-gathered** into the full flat buffer and
   copied into the stage's parameters.

Why our own flat-buffer step and not torch's `ZeroRedundancyOptimizer`: ZeroRedundancyOptimizer
hands out whole parameters to ranks (uneven shards: one 32000x4096 head or embedding weighs as much
as a dozen attention matrices), keeps the gradient all-reduce (it shards the optimizer state only,
so the gradient traffic and the full float32 gradient copies stay), broadcasts each updated
parameter from its owner, and consolidates a checkpoint through per-parameter broadcasts to one
rank. A flat layout gives shards equal to the element, exactly one reduce-scatter plus one
all-gather per step (together the bytes of the one all-reduce they replace), float32 gradient copies
of the slice only, and a checkpoint that is slice arithmetic. It is also what CPU offload needs
(`train.optimizer=cpu_adam`, pp_runtime/training/cpu_offload.py): the same flat slice, on the host, updated
by DeepSpeed's CPU Adam in chunks.

Checkpoints: the shards are gathered, a chunk at a time, onto data-parallel rank 0 of each stage
(into host memory) and written as full per-parameter tensors under their global names, exactly as
the plain optimizer writes them (pp_runtime/training/checkpoint.py). So a ZeRO-1 checkpoint resumes
under any replica count, with or without ZeRO or offload, and under any pipeline split; on load
every replica reads the full tensors of its stage into host memory and keeps its slice.

The AdamW arithmetic is torch's own (`torch.optim.AdamW` on views of the flat slice; elementwise,
so sharding does not change it): a ZeRO-1 step equals the plain step to the last bit in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from pp_runtime.distributed.parallel import ParallelContext

GATHER_CHUNK = 1 << 24  # elements per all-gather when a checkpoint collects the shards

# torch >= 2.13 renames the flat collectives (the old names warn); older torch has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Segment:
    """One parameter's place in the flat buffer."""

    name: str
    index: int  # position in the trainer's parameter list
    offset: int
    numel: int
    shape: tuple[int, ...]
    decay: bool


class FlatLayout:
    """Parameters laid end to end, decayed (>= 2-D) first, then undecayed; padded to dp equal shards."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], n_shards: int) -> None:
        order = [i for i, (_, p) in enumerate(named) if p.dim() >= 2] + [i for i, (_, p) in enumerate(named) if p.dim() < 2]
        segs, off = [], 0
        for i in order:
            name, p = named[i]
            segs.append(Segment(name, i, off, p.numel(), tuple(p.shape), p.dim() >= 2))
            off += p.numel()
        self.segments: tuple[Segment, ...] = tuple(segs)
        self.numel = off
        self.n_decay = sum(s.numel for s in segs if s.decay)
        self.n_shards = n_shards
        self.shard_numel = max(1, math.ceil(off / n_shards))
        self.padded = self.shard_numel * n_shards

    def shard_range(self, shard: int) -> tuple[int, int]:
        lo = shard * self.shard_numel
        return lo, lo + self.shard_numel

    def pieces(self, lo: int, hi: int) -> list[tuple[Segment, int, int]]:
        """(segment, start, end) in flat coordinates of every parameter overlapping [lo, hi)."""
        out = []
        for s in self.segments:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                out.append((s, a, b))
        return out

    def groups(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """The decayed and undecayed runs of [lo, hi) (flat coordinates), without the padding."""
        out = []
        for a, b, decay in ((0, self.n_decay, True), (self.n_decay, self.numel, False)):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                out.append((a, b, decay))
        return out


def _sum_of_squares(g: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Float64 sum of squares of `g`, a chunk at a time: `vector_norm(g, dtype=float64)` on the whole
    slice makes a float64 copy of it (27 GiB for one 7B stage, the peak of a cpu_adam step)."""
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for part in g.split(chunk):
        total += torch.linalg.vector_norm(part, 2, dtype=torch.float64).square()
    return total


class FlatAdamW:
    """AdamW over this rank's slice of a flat parameter buffer: ZeRO-1 and/or CPU offload.

    `zero`: shard over the data-parallel group (else every replica holds the whole stage and
    gradients are all-reduced). `offload`: master weights and states live in host memory and
    DeepSpeed's CPU Adam updates them (pp_runtime/training/cpu_offload.py). `master`: float32 master weights
    (always with offload); without, the slice keeps the model dtype (float32/float64 models).
    """

    def __init__(self, ctx: ParallelContext, named: Sequence[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, zero: bool, offload: bool,
                 master: bool, chunk_elems: int = 1 << 24) -> None:
        self.ctx = ctx
        self.params = [p for _, p in named]
        self.zero = zero and ctx.dp_size > 1
        self.offload = offload
        self.n_shards = ctx.dp_size if self.zero else 1
        self.shard = ctx.dp_rank if self.zero else 0
        self.layout = FlatLayout([(n, p) for n, p in named], self.n_shards)
        self.lo, self.hi = self.layout.shard_range(self.shard)
        self.model_dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.opt_dtype = torch.float32 if (master or offload) else self.model_dtype
        self.state_device = torch.device("cpu") if offload else self.device
        self.pin = offload and self.device.type == "cuda"
        self.steps_taken = 0  # AdamW steps applied (the optimizer's `step`)
        self.clip_coef = 1.0
        self._grad_lp: Optional[torch.Tensor] = None  # this step's reduced gradient slice (model dtype, device)
        S = self.layout.shard_numel
        self.master = self._alloc(S)
        self.exp_avg = self._alloc(S)
        self.exp_avg_sq = self._alloc(S)
        self.master.zero_()
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        with torch.no_grad():
            for seg, a, b in self.layout.pieces(self.lo, self.hi):
                src = self.params[seg.index].detach().reshape(-1)[a - seg.offset:b - seg.offset]
                self.master[a - self.lo:b - self.lo].copy_(src)
        # optimizer "parameters": views of the slice, each inside one weight-decay group (chunked for offload)
        step_len = chunk_elems if offload else self.layout.padded
        self.views: list[tuple[int, int, bool, torch.nn.Parameter]] = []  # (lo, hi) in slice coordinates
        for a, b, decay in self.layout.groups(self.lo, self.hi):
            for c in range(a, b, step_len):
                d = min(b, c + step_len)
                self.views.append((c - self.lo, d - self.lo, decay, torch.nn.Parameter(self.master[c - self.lo:d - self.lo])))
        decayed = [v[3] for v in self.views if v[2]]
        plain = [v[3] for v in self.views if not v[2]]
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if offload:
            from pp_runtime.training.cpu_offload import cpu_adam_class

            self.fused = False
            self.optimizer = cpu_adam_class()(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                              adamw_mode=True)
        else:
            self.fused = self.device.type == "cuda"
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=self.fused or None)
        self._set_states(0)
        if offload:
            from pp_runtime.training.cpu_offload import HostStepper

            self.stepper = HostStepper(self)

    # ------------------------------------------------------------------------------ buffers
    def _alloc(self, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.empty(n, dtype=dtype or self.opt_dtype, device=self.state_device, pin_memory=self.pin)

    def _set_states(self, step: int) -> None:
        """AdamW state of every view: views of the flat state slices, so the optimizer works in place."""
        for lo, hi, _, p in self.views:
            if self.offload:
                step_v = int(step)  # DeepSpeed's CPU Adam counts in a Python int
            else:
                step_v = torch.tensor(float(step), dtype=torch.float32, device=self.device if self.fused else "cpu")
            self.optimizer.state[p] = {"step": step_v, "exp_avg": self.exp_avg[lo:hi], "exp_avg_sq": self.exp_avg_sq[lo:hi]}

    # ------------------------------------------------------------------------------ the step
    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """Flatten the stage's gradients (model order) and reduce them over the replicas: a
        reduce-scatter under ZeRO (this rank keeps its slice), else an all-reduce."""
        L = self.layout
        parts = [grads[s.index].reshape(-1) for s in L.segments]
        if L.padded > L.numel:
            parts.append(torch.zeros(L.padded - L.numel, dtype=parts[0].dtype, device=parts[0].device))
        flat = torch.cat(parts)
        if self.zero:
            out = torch.empty(L.shard_numel, dtype=flat.dtype, device=flat.device)
            _reduce_scatter(out, flat, group=self.ctx.dp_group)
            del flat
        else:
            if self.ctx.dp_size > 1:
                dist.all_reduce(flat, group=self.ctx.dp_group)
            out = flat
        self._grad_lp = out

    def global_norm(self, grad_clip: float) -> float:
        """Exact global gradient norm over every stage and replica slice; sets the clip coefficient."""
        g = self._grad_lp
        sq = _sum_of_squares(g).reshape(1)
        if self.zero:
            dist.all_reduce(sq)  # every rank of the world holds a disjoint slice
        elif self.ctx.pp_size > 1:
            dist.all_reduce(sq, group=self.ctx.pp_group)
        norm = float(sq.sqrt())
        self.clip_coef = grad_clip / (norm + 1e-6) if grad_clip > 0 and norm > grad_clip else 1.0
        return norm

    def step(self, lr: float) -> None:
        """Apply AdamW to the slice and write the updated weights into the model's parameters."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.offload:
            new = self.stepper.step()
        else:
            g = self._grad_lp if self._grad_lp.dtype == self.opt_dtype else self._grad_lp.to(self.opt_dtype)
            if self.clip_coef != 1.0:
                g.mul_(self.clip_coef)
            for lo, hi, _, p in self.views:
                p.grad = g[lo:hi]
            self.optimizer.step()
            for _, _, _, p in self.views:
                p.grad = None
            new = self.master if self.opt_dtype == self.model_dtype else self.master.to(self.model_dtype)
        self._grad_lp = None
        self.steps_taken += 1
        self._publish(new)

    def skip(self) -> None:
        """A skipped (non-finite) step: drop the reduced gradients."""
        self._grad_lp = None

    def _publish(self, new: torch.Tensor) -> None:
        """`new`: the updated slice in the model dtype, on the device; all-gathered under ZeRO."""
        L = self.layout
        if self.zero:
            full = torch.empty(L.padded, dtype=new.dtype, device=new.device)
            _all_gather(full, new.contiguous(), group=self.ctx.dp_group)
        else:
            full = new
        with torch.no_grad():
            torch._foreach_copy_([self.params[s.index] for s in L.segments],
                                 [full[s.offset:s.offset + s.numel].view(s.shape) for s in L.segments])

    # ------------------------------------------------------------------------------ state
    def _gather(self, shard: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """Full per-parameter tensors of `shard`'s kind (master, exp_avg, ...) on data-parallel rank 0,
        in host memory, each its own tensor; None on the other replicas.

        Collective over the data-parallel group under ZeRO; gathered GATHER_CHUNK elements at a time so
        no device holds more than dp x GATHER_CHUNK of it."""
        L = self.layout
        keep = self.ctx.dp_rank == 0 or not self.zero
        out = {s.name: torch.empty(s.numel, dtype=shard.dtype) for s in L.segments} if keep else None

        def place(flat_lo: int, values: torch.Tensor) -> None:
            for seg, a, b in L.pieces(flat_lo, flat_lo + values.numel()):
                out[seg.name][a - seg.offset:b - seg.offset].copy_(values[a - flat_lo:b - flat_lo])

        S = L.shard_numel
        if not self.zero:
            place(0, shard.detach())
        else:
            for k in range(0, S, GATHER_CHUNK):
                c = min(GATHER_CHUNK, S - k)
                piece = shard[k:k + c].to(self.device)
                got = torch.empty(c * self.n_shards, dtype=shard.dtype, device=self.device)
                _all_gather(got, piece, group=self.ctx.dp_group)
                if keep:
                    got = got.cpu()
                    for d in range(self.n_shards):
                        place(d * S + k, got[d * c:(d + 1) * c])
        if out is None:
            return None
        return {s.name: out[s.name].view(s.shape) for s in L.segments}

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Master weights by global name on data-parallel rank 0 ({} elsewhere); collective."""
        return self._gather(self.master) or {}

    def full_optimizer_state(self) -> dict[str, torch.Tensor]:
        """NAME.exp_avg, NAME.exp_avg_sq, NAME.step on data-parallel rank 0 ({} elsewhere, and before
        the first step, like torch's lazily created AdamW state); collective."""
        if self.steps_taken == 0:
            return {}
        m, v = self._gather(self.exp_avg), self._gather(self.exp_avg_sq)
        if m is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        for s in self.layout.segments:
            out[f"{s.name}.exp_avg"] = m[s.name]
            out[f"{s.name}.exp_avg_sq"] = v[s.name]
            out[f"{s.name}.step"] = torch.tensor([float(self.steps_taken)], dtype=torch.float32)
        return out

    def load(self, weights: Mapping[str, torch.Tensor], optim: Mapping[str, torch.Tensor]) -> None:
        """Adopt full per-parameter tensors (a checkpoint of any layout): keep this rank's slice."""
        with torch.no_grad():
            for s in self.layout.segments:
                self.params[s.index].copy_(weights[s.name])
            steps = {int(float(optim[f"{s.name}.step"].reshape(-1)[0])) for s in self.layout.segments
                     if f"{s.name}.step" in optim}
            for seg, a, b in self.layout.pieces(self.lo, self.hi):
                sl = slice(a - seg.offset, b - seg.offset)
                self.master[a - self.lo:b - self.lo].copy_(weights[seg.name].reshape(-1)[sl])
                if f"{seg.name}.exp_avg" in optim:
                    self.exp_avg[a - self.lo:b - self.lo].copy_(optim[f"{seg.name}.exp_avg"].reshape(-1)[sl])
                    self.exp_avg_sq[a - self.lo:b - self.lo].copy_(optim[f"{seg.name}.exp_avg_sq"].reshape(-1)[sl])
        if len(steps) > 1:
            from pp_runtime.errors import CheckpointError

            raise CheckpointError(f"the checkpoint's optimizer state has parameters at different AdamW steps {sorted(steps)}; "
                                  "a flat optimizer (train.zero / train.optimizer=cpu_adam) needs them equal")
        self.steps_taken = steps.pop() if steps else 0
        self._set_states(self.steps_taken)
