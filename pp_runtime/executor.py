"""Run any valid pipeline schedule on this rank: its actions, in order, on the local stages.

Communication is derived from the actions and the stage -> rank map, never written per schedule:

- ``F(m, s)`` takes micro-batch m's tokens (s = 0) or the activations of ``F(m, s-1)``: handed
  over in memory when stage s-1 is on this rank, otherwise received from its rank. Its output
  goes to stage s+1 the same way (sent as soon as it is computed). The last stage computes the
  loss in its forward.
- ``B(m, s)`` takes the gradient of its output from ``B(m, s+1)`` (or starts from the loss on the
  last stage), runs the backward and hands the gradient of its input to stage s-1.
- ``W(m, s)`` (zero-bubble schedules that split the backward): ``B`` then runs the backward once
  with the Linear layers' weight-gradient matmuls postponed (`pp_runtime.weight_grad`), hands the
  input gradient on, and ``W`` does those matmuls. Nothing is computed twice.

Sends are asynchronous; a receive happens exactly when an action needs the data. Messages from
one peer arrive in the order that peer sent them, which need not be the order this rank wants
them (with 2 ranks and interleaving, rank 1 sends both activations and gradients to rank 0), so a
message that arrives early is kept until its action runs. Any schedule that passes
`pp_runtime.simulator.validate` (each rank's order respects the dependencies) and has no
cross-rank cycle runs without deadlock.

Every action's (start, end) is recorded: start is when its input is available (waiting for a
peer shows as a gap, like the bubble in the simulator's picture), end is when its compute is done.
On GPU these are CUDA events on the compute stream, read once at the end of the step (no
synchronisation per action), mapped to host seconds from an event recorded when `run` starts
(the trainer starts each step with an idle GPU). The same data draws the timeline picture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from pp_runtime.attention_meta import AttentionMeta
from pp_runtime.comm import KIND_DATA, PeerLink
from pp_runtime.model import StageModule
from pp_runtime.schedules import BACKWARD, FORWARD, WEIGHT, Action, Schedule
from pp_runtime.weight_grad import WeightGradQueue, enable_split_backward

_ACT, _GRAD = 0, 1  # message tags: activations for a forward, gradients for a backward


@dataclass
class MicroBatch:
    """What every rank knows of one micro-batch: first stage reads `tokens`, last stage `targets`."""

    tokens: torch.Tensor  # [T] long, flattened rows
    targets: torch.Tensor  # [T] long, IGNORE where no loss
    meta: AttentionMeta  # built from the rows' document lengths; the same on every stage


# loss_fn(logits [T, vocab], micro-batch) -> (loss to backpropagate, value to report)
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepRecord:
    """What one `run` produced on this rank."""

    loss_sum: torch.Tensor  # sum of the reported loss values over micro-batches (last stage; 0 elsewhere)
    timings: list[tuple[Action, float, float]] = field(default_factory=list)


class PipelineExecutor:
    """Interprets the actions of `schedule` for pipeline rank `pp_rank`.

    `stages` maps global stage index -> local StageModule (stage s lives on rank s % n_ranks);
    `peers[r]` is the global rank of pipeline rank r (for `PeerLink`, which addresses global ranks).
    """

    def __init__(
        self,
        schedule: Schedule,
        pp_rank: int,
        stages: Mapping[int, StageModule],
        peers: Sequence[int],
        link: Optional[PeerLink],
        device: torch.device,
    ) -> None:
        self.schedule, self.pp_rank, self.stages = schedule, pp_rank, dict(stages)
        self.peers, self.link, self.device = list(peers), link, device
        self.cuda_timing = device.type == "cuda"
        self.n_stages = schedule.n_stages
        self.actions = schedule.actions[pp_rank]
        mine = set(schedule.stages_of(pp_rank))
        if set(self.stages) != mine:
            raise ValueError(f"rank {pp_rank} holds stages {sorted(self.stages)} but the schedule puts {sorted(mine)} on it")
        if len(self.peers) != schedule.n_ranks:
            raise ValueError(f"{len(self.peers)} peer ranks for a schedule of {schedule.n_ranks} ranks")
        if schedule.n_ranks > 1 and link is None:
            raise ValueError("a schedule over several ranks needs a PeerLink")
        self._split = {(a.microbatch, a.stage) for row in schedule.actions for a in row if a.kind == WEIGHT}
        # found once here, not on every B of the step
        self._split_linears = {s: enable_split_backward(self.stages[s]) for s in {s for _, s in self._split} & mine}

    # ------------------------------------------------------------------------------ messaging
    def _rank_of(self, stage: int) -> int:
        return stage % self.schedule.n_ranks

    def _tag(self, kind: int, mb: int, stage: int) -> int:
        return (mb * self.n_stages + stage) * 2 + kind

    def _send(self, kind: int, mb: int, to_stage: int, tensor: torch.Tensor) -> None:
        """Hand `tensor` to `to_stage`'s action: in memory when local, else an async send."""
        rank = self._rank_of(to_stage)
        key = (kind, mb, to_stage)
        if rank == self.pp_rank:
            self._local[key] = tensor
        else:
            assert self.link is not None
            self.link.send(self.peers[rank], KIND_DATA, [tensor], tag=self._tag(kind, mb, to_stage))

    def _take(self, kind: int, mb: int, stage: int, from_stage: int) -> torch.Tensor:
        """The tensor addressed to (kind, mb, stage), receiving from its peer until it has arrived."""
        key = (kind, mb, stage)
        rank = self._rank_of(from_stage)
        if rank == self.pp_rank:
            return self._local.pop(key)
        peer = self.peers[rank]
        box = self._inbox.setdefault(peer, {})
        want = self._tag(kind, mb, stage)
        while want not in box:
            assert self.link is not None
            msg = self.link.recv(peer)
            if msg.kind != KIND_DATA:
                raise RuntimeError(f"pipeline rank {self.pp_rank}: unexpected message kind {msg.kind} from rank {peer}")
            box[msg.tag] = msg.tensors[0]
        return box.pop(want)

    # ------------------------------------------------------------------------------ actions
    def run(self, microbatches: Sequence[MicroBatch], loss_fn: LossFn) -> StepRecord:
        """Run this rank's actions for one step; parameter gradients accumulate in `.grad`."""
        if len(microbatches) != self.schedule.n_microbatches:
            raise ValueError(f"{len(microbatches)} micro-batches for a schedule of {self.schedule.n_microbatches}")
        self._local: dict[tuple[int, int, int], torch.Tensor] = {}
        self._inbox: dict[int, dict[int, torch.Tensor]] = {}
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._out_grads: dict[tuple[int, int], Optional[torch.Tensor]] = {}
        self._weight_grads: dict[tuple[int, int], WeightGradQueue] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        record = StepRecord(loss_sum=loss_sum)
        events: list[tuple[Action, torch.cuda.Event, torch.cuda.Event]] = []
        base_time, base = time.perf_counter(), self._mark()
        for action in self.actions:
            m, s = action.microbatch, action.stage
            if action.kind == FORWARD:
                self._forward_input(m, s, microbatches[m])
                start = self._mark()
                out = self._forward(m, s, microbatches[m])
                if s == self.n_stages - 1:
                    loss, value = loss_fn(out, microbatches[m])
                    record.loss_sum += value.detach().to(torch.float64)
                    self._outputs[(m, s)] = loss
                else:
                    self._outputs[(m, s)] = out
                    self._send(_ACT, m, s + 1, out.detach())
            elif action.kind == BACKWARD:
                self._backward_input(m, s)
                start = self._mark()
                self._backward(m, s, weights=(m, s) not in self._split)
            else:
                start = self._mark()
                self._weight_grad(m, s)
            end = self._mark()
            if self.cuda_timing:
                events.append((action, start, end))
            else:
                record.timings.append((action, start, end))
        if self.link is not None:
            self.link.flush()
        if events:
            torch.cuda.synchronize(self.device)
            record.timings = [(a, base_time + base.elapsed_time(st) / 1e3, base_time + base.elapsed_time(en) / 1e3)
                              for a, st, en in events]
        leftover = [*self._inputs, *self._outputs, *self._weight_grads]
        self._local.clear()
        self._inputs.clear()
        self._outputs.clear()
        self._weight_grads.clear()
        if leftover:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: micro-batch/stage {sorted(set(leftover))} never ran its backward")
        return record

    def _mark(self):
        """Now: host seconds on CPU, a recorded CUDA event on GPU."""
        if not self.cuda_timing:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _forward_input(self, m: int, s: int, mb: MicroBatch) -> None:
        if s == 0:
            x = mb.tokens
        else:
            x = self._take(_ACT, m, s, s - 1).detach().requires_grad_(True)
        self._inputs[(m, s)] = x

    def _forward(self, m: int, s: int, mb: MicroBatch) -> torch.Tensor:
        return self.stages[s](self._inputs[(m, s)], mb.meta, logits="all")

    def _backward_input(self, m: int, s: int) -> None:
        if s < self.n_stages - 1:
            self._out_grads[(m, s)] = self._take(_GRAD, m, s, s + 1)
        else:
            self._out_grads[(m, s)] = None

    def _backward(self, m: int, s: int, weights: bool) -> None:
        out, grad = self._outputs.pop((m, s)), self._out_grads.pop((m, s))
        inp = self._inputs.pop((m, s))
        if weights:
            torch.autograd.backward(out, grad)
        else:  # W(m, s) applies the postponed weight gradients later
            queue = WeightGradQueue()
            with queue.collecting(self._split_linears[s]):
                torch.autograd.backward(out, grad)
            self._weight_grads[(m, s)] = queue
        if s > 0:
            assert inp.grad is not None, f"stage {s} input received no gradient"
            self._send(_GRAD, m, s - 1, inp.grad)

    def _weight_grad(self, m: int, s: int) -> None:
        self._weight_grads.pop((m, s)).apply()
