"""Token sampling: greedy, temperature, top-k, top-p, with a reproducible stream per sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pp_runtime.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k} must be >= 0 (0 disables it)")


class Sampler:
    """Samples one token per sequence. The random stream is a pure function of (seed, sequence
    uid, position), so results do not depend on batching or on the number of stages, and no
    per-sequence state has to live on the sampling stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._gen = torch.Generator(device=device)

    def sample(
        self,
        logits: torch.Tensor,
        uids: Sequence[int],
        positions: Sequence[int],
        params: Sequence[SamplingParams],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] float -> (token ids [B], logprob of each chosen token under the model [B])."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        for i, (uid, pos, p) in enumerate(zip(uids, positions, params)):
            if p.temperature > 0:
                self._gen.manual_seed(hash((p.seed, uid, pos)) % (2**63 - 1))
                tokens[i] = _sample_row(logits[i].float(), p, self._gen)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    scaled = logits / p.temperature
    if p.top_k > 0 and p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        drop = (cum - sorted_p) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[0]
