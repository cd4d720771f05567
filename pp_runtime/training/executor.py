"""Run any valid pipeline schedule on this rank: its actions, in order, on the local stages.

Communication is derived from the actions and the schedule's stage -> rank map, never written per
schedule:

- ``F(m, s)`` takes micro-batch m's tokens (s = 0) or the activations of ``F(m, s-1)``: handed
  over in memory when stage s-1 is on this rank, otherwise received from its rank. Its output
  goes to stage s+1 the same way (sent as soon as it is computed). The last stage computes the
  loss in its forward.
- ``B(m, s)`` takes the gradient of its output from ``B(m, s+1)`` (or starts from the loss on the
  last stage), runs the backward and hands the gradient of its input to stage s-1.
- ``W(m, s)`` (zero-bubble schedules that split the backward): ``B`` then runs the backward once
  with the Linear layers' weight-gradient matmuls postponed (`pp_runtime.model.split_linear`), hands the
  input gradient on, and ``W`` does those matmuls. Nothing is computed twice.

Every message is a batched P2P op on the group of its directed edge and lane
(`pp_runtime.distributed.comm.EdgeLinks`): activations from rank i to rank j on one group, gradients from j
back to i on another, so with interleaved or V placements, where two ranks exchange both in both
directions, no receive waits behind an unrelated send. Both sides know every message's shape
(rows of a micro-batch x model dim, in the model dtype) and the order the sender sends each
lane's messages in (its action list), so no header travels: the receiver posts its receives in
that order, into buffers an action waits on when it starts. Each receive is posted when the action
needing it starts (with the messages its sender sent earlier on that lane), not ahead of it: on GPU
a posted receive is an NCCL kernel that occupies streaming multiprocessors until its data arrives,
so receives posted ahead slowed every matmul running beside them (our 1F1B measured 0.83x torch's
on 2 H200s that way), and CUDA loads a kernel lazily after the kernels already running finish, so
a receive pending on data that depends on this rank's next action could hang the first step. A
message that arrives before it is needed (a sender's order need not be the receiver's) waits in
its buffer. Any schedule that passes `pp_runtime.training.simulator.validate` (each rank's order respects
the dependencies) and has no cross-rank cycle runs without deadlock.

Every action's (start, end) is recorded: start is when its input is available (waiting for a
peer shows as a gap, like the bubble in the simulator's picture), end is when its compute is done.
On GPU these are CUDA events on the compute stream, read once at the end of the step (no
synchronisation per action: waiting for a receive makes the stream wait, not the host), mapped
to host seconds from an event recorded when `run` starts (the trainer starts each step with an
idle GPU). The same data draws the timeline picture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from pp_runtime.distributed.comm import ACT, GRAD, Edge, EdgeLinks
from pp_runtime.model.attention_meta import AttentionMeta
from pp_runtime.model.split_linear import InPlaceWeightGrads, WeightGradQueue, enable_split_backward
from pp_runtime.model.transformer import StageModule
from pp_runtime.training.schedules import BACKWARD, FORWARD, WEIGHT, Action, Schedule

Message = tuple[str, int, int]  # (lane, micro-batch, stage of the action that consumes it)
Channel = tuple[int, str]  # (source pipeline rank, lane)


def pipeline_edges(schedule: Schedule) -> set[Edge]:
    """The directed edges (source rank, destination rank, lane) a schedule's traffic crosses."""
    edges = set()
    for s in range(schedule.n_stages - 1):
        a, b = schedule.rank_of(s), schedule.rank_of(s + 1)
        if a != b:
            edges |= {(a, b, ACT), (b, a, GRAD)}
    return edges


def _outbound(schedule: Schedule, rank: int) -> list[tuple[int, Message]]:
    """(destination rank, message) of every tensor `rank` sends, in the order it sends them."""
    out = []
    for a in schedule.actions[rank]:
        m, s = a.microbatch, a.stage
        if a.kind == FORWARD and s + 1 < schedule.n_stages and schedule.rank_of(s + 1) != rank:
            out.append((schedule.rank_of(s + 1), (ACT, m, s + 1)))
        elif a.kind == BACKWARD and s > 0 and schedule.rank_of(s - 1) != rank:
            out.append((schedule.rank_of(s - 1), (GRAD, m, s - 1)))
    return out


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

    `stages` maps global stage index -> local StageModule (the stages the schedule puts on this
    rank); `peers[r]` is the global rank of pipeline rank r (`links` addresses global ranks).
    """

    def __init__(
        self,
        schedule: Schedule,
        pp_rank: int,
        stages: Mapping[int, StageModule],
        peers: Sequence[int],
        links: Optional[EdgeLinks],
        device: torch.device,
    ) -> None:
        self.schedule, self.pp_rank, self.stages = schedule, pp_rank, dict(stages)
        self.peers, self.links, self.device = list(peers), links, device
        self.cuda_timing = device.type == "cuda"
        self.n_stages = schedule.n_stages
        self.actions = schedule.actions[pp_rank]
        mine = set(schedule.stages_of(pp_rank))
        if set(self.stages) != mine:
            raise ValueError(f"rank {pp_rank} holds stages {sorted(self.stages)} but the schedule puts {sorted(mine)} on it")
        if len(self.peers) != schedule.n_ranks:
            raise ValueError(f"{len(self.peers)} peer ranks for a schedule of {schedule.n_ranks} ranks")
        if schedule.n_ranks > 1 and links is None:
            raise ValueError("a schedule over several ranks needs EdgeLinks")
        module = next(iter(self.stages.values()))
        self.dim, self.dtype = module.args.dim, next(module.parameters()).dtype  # every message is [rows, dim]
        self._split = {(a.microbatch, a.stage) for row in schedule.actions for a in row if a.kind == WEIGHT}
        # every stage's Linears add their weight gradients in place (and postpone them for W actions);
        # marked at their first forward here, so modules this executor never runs stay stock
        self._linears: dict[int, list] = {}
        self._in_place = InPlaceWeightGrads()
        self._plan_receives()

    # ------------------------------------------------------------------------------ messaging
    def _plan_receives(self) -> None:
        """What each peer sends this rank, per lane, in sending order; which action needs which."""
        sched, me = self.schedule, self.pp_rank
        self._inbound: dict[Channel, list[Message]] = {}
        for src in range(sched.n_ranks):
            for dst, msg in _outbound(sched, src):
                if dst == me:
                    self._inbound.setdefault((src, msg[0]), []).append(msg)
        where = {msg: (channel, i) for channel, msgs in self._inbound.items() for i, msg in enumerate(msgs)}
        self._needs: dict[int, tuple[Channel, int]] = {}  # action index -> (channel, position on it)
        for i, a in enumerate(self.actions):
            msg = (ACT, a.microbatch, a.stage) if a.kind == FORWARD else (GRAD, a.microbatch, a.stage)
            if a.kind != WEIGHT and msg in where:
                self._needs[i] = where[msg]

    def _send(self, lane: str, mb: int, to_stage: int, tensor: torch.Tensor) -> None:
        """Hand `tensor` to `to_stage`'s action: in memory when local, else an async send."""
        rank = self.schedule.rank_of(to_stage)
        if rank == self.pp_rank:
            self._local[(lane, mb, to_stage)] = tensor
        else:
            assert self.links is not None
            self.links.send(tensor.contiguous(), self.peers[rank], lane)

    def _post_receives(self, step: int, microbatches: Sequence[MicroBatch]) -> None:
        """Post the receive action `step` needs, if any (and, to keep each lane in sending order, of
        the messages sent before it on that lane)."""
        if step not in self._needs:
            return
        channel, position = self._needs[step]
        src, lane = channel
        while self._posted[channel] <= position:
            msg = self._inbound[channel][self._posted[channel]]
            rows = microbatches[msg[1]].tokens.shape[0]
            buf = torch.empty(rows, self.dim, dtype=self.dtype, device=self.device)
            assert self.links is not None
            self._arrived[msg] = (buf, self.links.recv(buf, self.peers[src], lane))
            self._posted[channel] += 1

    def _take(self, lane: str, mb: int, stage: int) -> torch.Tensor:
        """The tensor addressed to (lane, mb, stage): from memory, or its receive once complete."""
        key = (lane, mb, stage)
        if key in self._local:
            return self._local.pop(key)
        buf, work = self._arrived.pop(key)
        work.wait()
        return buf

    # ------------------------------------------------------------------------------ actions
    def run(self, microbatches: Sequence[MicroBatch], loss_fn: LossFn) -> StepRecord:
        """Run this rank's actions for one step; parameter gradients accumulate in `.grad`."""
        if len(microbatches) != self.schedule.n_microbatches:
            raise ValueError(f"{len(microbatches)} micro-batches for a schedule of {self.schedule.n_microbatches}")
        self._local: dict[Message, torch.Tensor] = {}
        self._posted = {channel: 0 for channel in self._inbound}
        self._arrived: dict[Message, tuple[torch.Tensor, dist.Work]] = {}
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._out_grads: dict[tuple[int, int], Optional[torch.Tensor]] = {}
        self._weight_grads: dict[tuple[int, int], WeightGradQueue] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        record = StepRecord(loss_sum=loss_sum)
        events: list[tuple[Action, torch.cuda.Event, torch.cuda.Event]] = []
        base_time, base = time.perf_counter(), self._mark()
        for step, action in enumerate(self.actions):
            m, s = action.microbatch, action.stage
            self._post_receives(step, microbatches)
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
                    self._send(ACT, m, s + 1, out.detach())
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
        if self.links is not None:
            self.links.flush()
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
            x = self._take(ACT, m, s).detach().requires_grad_(True)
        self._inputs[(m, s)] = x

    def _forward(self, m: int, s: int, mb: MicroBatch) -> torch.Tensor:
        if s not in self._linears:  # found once; before any forward, so a checkpointed recompute matches
            self._linears[s] = enable_split_backward(self.stages[s])
        return self.stages[s](self._inputs[(m, s)], mb.meta, logits="all")

    def _backward_input(self, m: int, s: int) -> None:
        if s < self.n_stages - 1:
            self._out_grads[(m, s)] = self._take(GRAD, m, s)
        else:
            self._out_grads[(m, s)] = None

    def _backward(self, m: int, s: int, weights: bool) -> None:
        out, grad = self._outputs.pop((m, s)), self._out_grads.pop((m, s))
        inp = self._inputs.pop((m, s))
        queue = self._in_place if weights else WeightGradQueue()  # W(m, s) applies a postponed queue later
        with queue.collecting(self._linears[s]):
            torch.autograd.backward(out, grad)
        if not weights:
            self._weight_grads[(m, s)] = queue
        if s > 0:
            assert inp.grad is not None, f"stage {s} input received no gradient"
            self._send(GRAD, m, s - 1, inp.grad)

    def _weight_grad(self, m: int, s: int) -> None:
        self._weight_grads.pop((m, s)).apply()
