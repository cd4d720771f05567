"""Memory plan before training: estimated device bytes per pipeline rank, and a refusal when a rank
would not fit, instead of a CUDA out-of-memory error in the middle of a step.

`plan_memory` is a pure function of the model shape, the stage plan, the schedule and the
training settings. Per pipeline rank (all its virtual stages), with P parameters, T of them
trainable, b bytes per element of the model dtype, n = data-parallel replicas under ZeRO-1 (else 1):

- weights      P x b
- gradients    T x b (accumulated over the micro-batches in the model dtype); the plain optimizer
               with float32 master weights also keeps a float32 copy: + T x 4
- optimizer    master weights (4 bytes, when kept) + exp_avg + exp_avg_sq (4 bytes each with
               master weights, else b), for T / n parameters; with `cpu_adam` they are in host
               memory (`host`: T / n x (12 + b), the b for the pinned transfer buffer) and the
               device keeps only the T / n x b slice the updated weights come up into
- activations  peak in-flight micro-batches of the rank under the schedule (pp_runtime/training/simulator.py)
               x the bytes one micro-batch leaves behind on one of its (virtual) stages, averaged
               over them (a split backward's pending W counts as the whole micro-batch: an
               over-estimate for the zero-bubble schedules). Per token, per layer, what autograd saves:
                   b x (6 dim + 2 kv_dim + 4 hidden x k)
               (norm input and output, q, attention output, residual, second norm's output; k, v;
               w1 and w3 outputs, SiLU output and the product, for each of the top-k experts of an
               MoE layer, k = 1 for a dense layer) + 4 x n_experts for the router's logits.
               Under activation checkpointing a layer keeps its input only (b x dim) and one layer's
               full set is recomputed at a time. The head stage adds the logits: vocab x (b + 8)
               per token (model dtype, their float32 copy and its gradient).

The step's transient buffers (the flattened gradients, float32 copies of a gradient slice) come
after the activations are freed and are smaller than them; they are not counted. Neither are the
CUDA context, the allocator's fragmentation nor the communication buffers: the refusal compares
the estimate with the memory free on the device at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pp_runtime.errors import ConfigError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.partition import StagePlan, StageSpec
from pp_runtime.training.schedules import Schedule

GiB = 1 << 30


@dataclass(frozen=True)
class RankMemory:
    """Estimated bytes on one pipeline rank's device (and host, for cpu_adam)."""

    rank: int
    stages: tuple[int, ...]
    params: int
    trainable: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    peak_microbatches: int
    host: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def line(self) -> str:
        stages = ",".join(map(str, self.stages))
        trainable = f" ({self.trainable / 1e6:,.2f}M trainable)" if self.trainable != self.params else ""
        host = f" | host {_gib(self.host)}" if self.host else ""
        return (f"  rank {self.rank} (stage {stages}): {self.params / 1e6:,.2f}M params{trainable} | weights {_gib(self.weights)}"
                f" | grads {_gib(self.grads)} | optimizer {_gib(self.optimizer)} | activations {_gib(self.activations)}"
                f" ({self.peak_microbatches} micro-batch(es) in flight) | total {_gib(self.total)}{host}")


@dataclass(frozen=True)
class MemoryPlan:
    ranks: tuple[RankMemory, ...]
    dtype: torch.dtype
    schedule: str
    optimizer: str
    zero: bool

    def describe(self) -> str:
        how = f"{self.optimizer}" + (", ZeRO-1" if self.zero else "")
        head = (f"memory plan (estimated device bytes per pipeline rank; {str(self.dtype).removeprefix('torch.')}, "
                f"{how}, schedule {self.schedule}):")
        return "\n".join([head] + [r.line() for r in self.ranks])

    def check(self, pp_rank: int, free_bytes: int, *, pp_size: int, dp_size: int) -> None:
        """Raise a one-line ConfigError when `pp_rank`'s estimate exceeds `free_bytes`."""
        r = self.ranks[pp_rank]
        if r.total <= free_bytes:
            return
        raise ConfigError(refusal(r, free_bytes, pp_size=pp_size, dp_size=dp_size, zero=self.zero,
                                  offload=self.optimizer == "cpu_adam"))


def refusal(r: RankMemory, free_bytes: int, *, pp_size: int, dp_size: int, zero: bool, offload: bool) -> str:
    remedies = ["LoRA (train.lora.rank=16: no gradients or optimizer state for the base weights)"]
    if not zero:
        remedies.append("ZeRO-1 (train.zero=1 with pipeline.data_parallel=2 or more: the optimizer state split over the replicas)"
                        if dp_size == 1 else f"ZeRO-1 (train.zero=1: the optimizer state split over the {dp_size} replicas)")
    if not offload:
        remedies.append("optimizer offload (train.optimizer=cpu_adam: master weights and AdamW state in host memory)")
    remedies.append(f"more stages (pipeline.stages={pp_size * 2} on more GPUs)")
    remedies.append("train.activation_checkpointing=true or fewer rows per micro-batch" if r.activations > r.total // 4
                    else "")
    remedies = [x for x in remedies if x]
    return (f"memory plan: pipeline rank {r.rank} (stage {','.join(map(str, r.stages))}) needs an estimated "
            f"{_gib(r.total)} (weights {_gib(r.weights)}, grads {_gib(r.grads)}, optimizer {_gib(r.optimizer)}, "
            f"activations {_gib(r.activations)}) but its GPU has {_gib(free_bytes)} free; fit it with "
            + ", ".join(remedies[:-1]) + f" or {remedies[-1]} (train.memory_check=false skips this check)")


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB (a small model's plan would read 0.00 GiB everywhere)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def stage_params(args: ModelArgs, spec: StageSpec) -> int:
    """Parameters one stage holds (counted on the model built on meta)."""
    from pp_runtime.checkpoints.formats import stage_shapes

    return sum(math.prod(s) for s in stage_shapes(args, spec).values())


def activation_bytes(args: ModelArgs, spec: StageSpec, tokens: int, elem: int, checkpointing: bool) -> int:
    """Bytes one micro-batch of `tokens` leaves saved for the backward on stage `spec` (see the module doc)."""
    kv_dim = args.n_kv_heads * args.head_dim
    k = args.moe.num_experts_per_tok if args.moe else 1
    router = 4 * args.moe.num_experts if args.moe else 0
    per_layer = elem * (6 * args.dim + 2 * kv_dim + 4 * args.hidden_dim * k) + router
    n_layers = spec.last - spec.first
    if checkpointing:
        act = tokens * (n_layers * elem * args.dim + (per_layer if n_layers else 0))
    else:
        act = tokens * n_layers * per_layer
    if spec.has_head:
        act += tokens * args.vocab_size * (elem + 8)
    return act


def plan_memory(
    args: ModelArgs,
    plan: StagePlan,
    schedule: Schedule,
    *,
    dtype: torch.dtype,
    tokens_per_microbatch: int,
    dp_size: int = 1,
    zero: bool = False,
    optimizer: str = "adamw",
    master: Optional[bool] = None,
    activation_checkpointing: bool = False,
    trainable: Optional[Sequence[int]] = None,
    params: Optional[Sequence[int]] = None,
) -> MemoryPlan:
    """Estimated bytes per pipeline rank. `trainable` / `params`: per-rank counts overriding those of
    the plan (LoRA: only the adapters train; tests: hand-made counts)."""
    from pp_runtime.training.simulator import simulate

    elem = torch.empty((), dtype=dtype).element_size()
    if master is None:
        master = dtype in (torch.bfloat16, torch.float16)
    offload = optimizer == "cpu_adam"
    if offload:
        master = True  # the host copy is float32 whatever the model dtype
    shards = dp_size if zero and dp_size > 1 else 1
    peaks = simulate(schedule).peak_activations
    ranks = []
    for r in range(plan.n_ranks):
        specs = plan.for_rank(r)
        P = params[r] if params is not None else sum(stage_params(args, s) for s in specs)
        T = trainable[r] if trainable is not None else P
        state_elem = 4 if master else elem
        grads = T * elem + (T * 4 if master and not (zero or offload) else 0)
        owned = math.ceil(T / shards)
        state = owned * ((4 if master else 0) + 2 * state_elem)
        device_opt, host = (owned * elem, owned * (12 + elem)) if offload else (state, 0)
        per_mb = [activation_bytes(args, s, tokens_per_microbatch, elem, activation_checkpointing) for s in specs]
        avg = sum(per_mb) / max(1, len(per_mb))
        acts = int(round(peaks[r] * avg))
        ranks.append(RankMemory(rank=r, stages=tuple(s.index for s in specs), params=P, trainable=T, weights=P * elem,
                                grads=grads, optimizer=device_opt, activations=acts, peak_microbatches=peaks[r], host=host))
    return MemoryPlan(tuple(ranks), dtype, schedule.name, optimizer, shards > 1)


def device_free_bytes(device: torch.device) -> Optional[int]:
    """Free memory of `device` (CUDA), None on CPU (the plan is printed, never enforced there)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
