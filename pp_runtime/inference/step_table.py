"""One generation step as every stage sees it, and its fixed-size wire form.

Stage 0 decides each micro-batch; the step table travels down the pipe ahead of the activations
(on the CPU control plane), so every stage knows the sequences, slots, positions and sampling
settings of a step before its input arrives, and all stages agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pp_runtime.distributed.comm import TABLE_COLS
from pp_runtime.inference.sampling import SamplingParams


@dataclass(frozen=True)
class StepChunk:
    """One sequence's share of a step: `n_tokens` new tokens at absolute `start` in cache `slot`."""

    uid: int
    slot: int
    start: int
    n_tokens: int
    sample: bool  # the chunk ends the prompt (or is a decode token): the last stage samples after it
    sampling: SamplingParams


@dataclass(frozen=True)
class Step:
    """A micro-batch step: its chunks in flat-stream order, padded to `bucket` tokens on the wire."""

    kind: int
    chunks: tuple[StepChunk, ...]
    bucket: int = 0  # tokens on the wire (>= n_tokens); fixed shapes let GPU stages replay graphs
    text_len: int = 0  # bytes of the message that follows a KIND_ABORT table

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def greedy_only(self) -> bool:
        return all(c.sampling.temperature == 0 for c in self.chunks)

    def to_table(self, rows: int) -> torch.Tensor:
        """int64 [rows + 1, 9]: a header row, then uid, slot, start, n_tokens, sample, seed and
        temperature, top_p, top_k as float64 bits per chunk; unused rows are zero."""
        if len(self.chunks) > rows:
            raise ValueError(f"{len(self.chunks)} chunks do not fit a table of {rows} rows")
        table = torch.zeros((rows + 1, TABLE_COLS), dtype=torch.int64)
        table[0, :4] = torch.tensor([self.kind, len(self.chunks), self.bucket, self.text_len])
        if self.chunks:
            n = len(self.chunks)
            table[1 : n + 1, :6] = torch.tensor(
                [[c.uid, c.slot, c.start, c.n_tokens, int(c.sample), c.sampling.seed] for c in self.chunks])
            floats = torch.tensor([[c.sampling.temperature, c.sampling.top_p, float(c.sampling.top_k)]
                                   for c in self.chunks], dtype=torch.float64)
            table[1 : n + 1, 6:] = floats.view(torch.int64)
        return table

    @classmethod
    def from_table(cls, table: torch.Tensor) -> "Step":
        kind, n, bucket, text_len = table[0, :4].tolist()
        ints = table[1 : n + 1, :6].tolist()
        floats = table[1 : n + 1, 6:].contiguous().view(torch.float64).tolist()
        chunks = tuple(
            StepChunk(u, s, st, k, bool(sm), SamplingParams(temperature=t, top_p=p, top_k=int(tk), seed=sd))
            for (u, s, st, k, sm, sd), (t, p, tk) in zip(ints, floats)
        )
        return cls(kind, chunks, bucket, text_len)
