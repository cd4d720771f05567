"""Stage 0's step scheduler: which sequences form the next micro-batch.

Decode tokens and prefill chunks mix in one micro-batch under a token budget. Sequences whose
previous step is still in the pipe are not eligible, so micro-batches in flight never share a
sequence. Finished sequences free their cache slot and waiting requests join (continuous batching).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from pp_runtime.errors import InputError
from pp_runtime.inference.sampling import SamplingParams


@dataclass
class Request:
    uid: int  # dense index in input order; also keys the sampling stream
    id: Any  # the user's id
    prompt: str
    prompt_tokens: list[int]
    max_new_tokens: int
    sampling: SamplingParams


@dataclass
class Completion:
    request: Request
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS), "length", or "error" (the model produced non-finite logits)


@dataclass
class _Seq:
    request: Request
    slot: int
    fed: int = 0  # tokens already sent through the model
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    in_flight: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)


@dataclass(frozen=True)
class ChunkPlan:
    """One sequence's share of a micro-batch."""

    uid: int
    slot: int
    start: int
    tokens: tuple[int, ...]
    sample: bool  # the chunk ends the prompt (or is a decode token): sample the next token
    sampling: SamplingParams
    prefill: bool  # the tokens are prompt tokens (not a generated token fed back)


@dataclass(frozen=True)
class StepPlan:
    """What one pipeline step of a micro-batch runs: its sequences' chunks (prefill pieces and decode
    tokens). Not training's `MicroBatch`, which holds a slice of a batch's tensors."""

    chunks: tuple[ChunkPlan, ...]

    @property
    def n_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass(frozen=True)
class SchedulerConfig:
    n_slots: int
    max_seqs: int  # sequences per micro-batch
    max_tokens: int  # token budget per micro-batch
    chunk_size: int  # longest prefill chunk of one sequence
    microbatches: int = 1  # in flight; when few sequences are left they are spread over all of them


class StepScheduler:
    def __init__(self, cfg: SchedulerConfig, requests: Iterator[Request], eos_id: Optional[int]) -> None:
        self.cfg = cfg
        self._requests = requests
        self._exhausted = False
        self.eos_id = eos_id
        self._free_slots = deque(range(cfg.n_slots))
        self._active: dict[int, _Seq] = {}  # uid -> seq, in admission order

    @property
    def done(self) -> bool:
        return self._exhausted and not self._active

    def _admit(self) -> None:
        while self._free_slots and not self._exhausted:
            req = next(self._requests, None)
            if req is None:
                self._exhausted = True
                return
            if not req.prompt_tokens:
                raise InputError(f"request {req.id!r}: the prompt tokenises to nothing; give a non-empty prompt")
            self._active[req.uid] = _Seq(req, self._free_slots.popleft())

    def next_microbatch(self) -> Optional[StepPlan]:
        """Decode steps first (they are cheap and keep latency low), then prefill chunks."""
        self._admit()
        # Once the input runs dry, an even share per micro-batch keeps every pipeline stage busy
        # until the end, instead of one full micro-batch and idle stages behind it.
        max_seqs = min(self.cfg.max_seqs, -(-len(self._active) // self.cfg.microbatches))
        budget, chunks = self.cfg.max_tokens, []
        ready = [s for s in self._active.values() if not s.in_flight]
        decoding = [s for s in ready if s.fed >= s.prompt_len]
        prefilling = [s for s in ready if s.fed < s.prompt_len]
        for s in decoding:
            if len(chunks) == max_seqs or budget < 1:
                break
            chunks.append(self._take(s, (s.generated[-1],)))
            budget -= 1
        for s in prefilling:
            if len(chunks) == max_seqs or budget < 1:
                break
            n = min(self.cfg.chunk_size, budget, s.prompt_len - s.fed)
            chunks.append(self._take(s, tuple(s.request.prompt_tokens[s.fed : s.fed + n])))
            budget -= n
        return StepPlan(tuple(chunks)) if chunks else None

    def _take(self, s: _Seq, tokens: tuple[int, ...]) -> ChunkPlan:
        start = s.fed
        s.fed += len(tokens)
        s.in_flight = True
        return ChunkPlan(s.request.uid, s.slot, start, tokens, s.fed >= s.prompt_len, s.request.sampling,
                         prefill=start < s.prompt_len)

    def complete(self, mb: StepPlan, tokens: list[int], logprobs: list[float],
                 finite: Optional[list[bool]] = None) -> list[Completion]:
        """Record the sampled tokens of a micro-batch that came back; return finished sequences.

        A sequence whose logits were not finite stops with finish_reason "error" and keeps only the
        tokens sampled before: nothing sampled from NaN reaches the user."""
        finished = []
        for i, (ch, tok, lp) in enumerate(zip(mb.chunks, tokens, logprobs)):
            s = self._active[ch.uid]
            s.in_flight = False
            if finite is not None and not finite[i]:
                reason: Optional[str] = "error"
            elif not ch.sample:
                continue
            else:
                s.generated.append(int(tok))
                s.logprobs.append(float(lp))
                reason = self._finish_reason(s, int(tok))
            if reason:
                del self._active[ch.uid]
                self._free_slots.append(s.slot)
                finished.append(Completion(s.request, s.generated, s.logprobs, reason))
        return finished

    def _finish_reason(self, s: _Seq, tok: int) -> Optional[str]:
        if self.eos_id is not None and tok == self.eos_id:
            return "stop"
        if len(s.generated) >= s.request.max_new_tokens:
            return "length"
        return None
