"""Token sampling: greedy, temperature, top-k, top-p, as one fixed-shape tensor program.

`sample_tokens` has no per-row Python, no host sync and no data-dependent shapes, so a whole
decode step (sampling included) can be replayed as a CUDA graph. Its randomness is a counter-based
hash of (seed, sequence uid, position): a sequence's draw does not depend on the batch it is
in, on padding, on the device or on the number of pipeline stages, and no random state has to
live on the sampling stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Optional, Sequence

import torch

from pp_runtime.errors import ConfigError

_INT64_MIN, _INT64_END = -(2**63), 2**63


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int = 0

    def __post_init__(self) -> None:
        """Also the `sampling` group's check (its schema is this class): a bad value names `sampling.field`."""
        values = _coerced(self.temperature, self.top_p, self.top_k, self.seed, "sampling")
        for name, value in zip(("temperature", "top_p", "top_k", "seed"), values):
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, temperature: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0, seed: Any = 0,
              where: str = "sampling") -> "SamplingParams":
        """Build from loosely typed values (config strings, JSON numbers); a bad value is a
        ConfigError naming `where.field`, never a raw TypeError/ValueError."""
        return cls(*_coerced(temperature, top_p, top_k, seed, where))


def _coerced(temperature: Any, top_p: Any, top_k: Any, seed: Any, where: str) -> tuple[float, float, int, int]:
    t, p = _as_number(temperature, f"{where}.temperature"), _as_number(top_p, f"{where}.top_p")
    k, s = _as_integer(top_k, f"{where}.top_k"), _as_integer(seed, f"{where}.seed")
    if t < 0:
        raise ConfigError(f"{where}.temperature={t} must be a finite number >= 0 (0 is greedy)")
    if not 0 < p <= 1:
        raise ConfigError(f"{where}.top_p={p} must be in (0, 1]")
    if k < 0:
        raise ConfigError(f"{where}.top_k={k} must be >= 0 (0 disables it)")
    if not _INT64_MIN <= s < _INT64_END:
        raise ConfigError(f"{where}.seed={s} must fit in a signed 64-bit integer")
    return t, p, k, s


def _as_number(value: Any, name: str) -> float:
    if not isinstance(value, bool):
        try:
            x = float(value)
            if math.isfinite(x):
                return x
        except (TypeError, ValueError, OverflowError):
            pass
    raise ConfigError(f"{name}={value!r} is not a finite number")


def _as_integer(value: Any, name: str) -> int:
    """Integers and integral numbers or strings ("3", "3.0"); never a silent truncation of 2.5."""
    error = ConfigError(f"{name}={value!r} is not an integer")
    if isinstance(value, bool):
        raise error
    if isinstance(value, (Integral, str)):
        try:
            return int(value)
        except ValueError:
            pass  # "3.0" is read below
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error from None
    if not number.is_integer():  # nan, inf and fractions alike
        raise error
    return int(number)


# ---------------------------------------------------------------------------------------------
# Per-row settings on the device

_INT_FIELDS = ("top_k", "seed", "uid", "position")  # int64 rows of the packed buffer, in order
_FLOAT_FIELDS = ("temperature", "top_p")  # then float32 rows


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors of one fixed shape [B]. All fields are views of
    one byte buffer, so `fill_` refreshes them with a single host-to-device copy (graph replay)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 = no limit
    seed: torch.Tensor  # int64
    uid: torch.Tensor  # int64
    position: torch.Tensor  # int64: the position the sampled token will take
    storage: torch.Tensor = field(repr=False)  # uint8: the packed bytes every field above views

    @classmethod
    def build(cls, params: Sequence[SamplingParams], uids: Sequence[int], positions: Sequence[int],
              device: torch.device, pad_to: Optional[int] = None) -> "SamplingBatch":
        """Rows past len(params) up to `pad_to` are greedy padding."""
        n = len(params) if pad_to is None else pad_to
        storage = torch.empty(n * (8 * len(_INT_FIELDS) + 4 * len(_FLOAT_FIELDS)), dtype=torch.uint8,
                              device=device)
        ints = storage[: 8 * len(_INT_FIELDS) * n].view(torch.int64).view(len(_INT_FIELDS), n)
        floats = storage[8 * len(_INT_FIELDS) * n:].view(torch.float32).view(len(_FLOAT_FIELDS), n)
        views = dict(zip(_INT_FIELDS, ints.unbind(0))) | dict(zip(_FLOAT_FIELDS, floats.unbind(0)))
        batch = cls(storage=storage, **views)
        batch.fill_(params, uids, positions)
        return batch

    def __len__(self) -> int:
        return self.uid.shape[0]

    def fill_(self, params: Sequence[SamplingParams], uids: Sequence[int], positions: Sequence[int]) -> None:
        """Overwrite the rows in place (padding the rest): the buffers keep their addresses."""
        n, size = len(params), len(self)
        if not n == len(uids) == len(positions) or n > size:
            raise ValueError(f"{n} params, {len(uids)} uids, {len(positions)} positions for {size} rows")
        pad = size - n
        ints = [*(p.top_k for p in params), *[0] * pad, *(p.seed for p in params), *[0] * pad,
                *uids, *[0] * pad, *positions, *[0] * pad]  # the order of _INT_FIELDS
        floats = [*(p.temperature for p in params), *[0.0] * pad, *(p.top_p for p in params), *[1.0] * pad]
        host = torch.cat([torch.tensor(ints, dtype=torch.int64).view(torch.uint8),
                          torch.tensor(floats, dtype=torch.float32).view(torch.uint8)])
        if self.storage.is_cuda:  # pinned + async: the caching host allocator keeps it alive until copied
            host = host.pin_memory()
        self.storage.copy_(host, non_blocking=self.storage.is_cuda)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: splitmix64 in int64 tensors (multiplication wraps mod 2**64)


def _signed(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function: a bijection of 64-bit words with full avalanche."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def random_bits(seed: torch.Tensor, uid: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """int64 [B]: 64 random bits per row, a pure function of its (seed, uid, position). The pair
    (seed, uid) picks a splitmix64 stream and the row takes that stream's output number position + 1;
    streams of different pairs start at independent random points of the 2**64 cycle."""
    stream = _mix64(seed * _GAMMA + uid)
    return _mix64(stream + (position + 1) * _GAMMA)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1) from the top 24 bits: every value m / 2**24 is exact."""
    return _shr(bits, 40).to(torch.float32) * 2.0**-24


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch, *,
                  greedy_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token ids int64 [B], logprob of each id under the unscaled model float32 [B],
    whether the row's logits were all finite bool [B]). A non-finite row gets id 0 and touches no
    other row. `greedy_only` (every row has temperature 0, known on the host) skips the sort."""
    if logits.dim() != 2 or logits.shape[0] != len(batch):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for a sampling batch of {len(batch)} rows")
    finite = torch.isfinite(logits).all(dim=-1)
    ids = logits.argmax(dim=-1)
    if not greedy_only:
        ids = torch.where(batch.temperature > 0, _sample_filtered(logits, batch), ids)
    ids = torch.where(finite, ids, 0)
    full = logits.float()
    logprobs = full.gather(1, ids[:, None])[:, 0] - torch.logsumexp(full, dim=-1)
    return ids, logprobs, finite


def _sample_filtered(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Inverse-CDF draw, one uniform per row, over softmax(logits / T) sorted in descending order
    (stable: equal logits keep token-id order), cut to its first top_k tokens and then to the
    smallest prefix whose mass, renormalised over those, reaches top_p."""
    vocab = logits.shape[-1]
    x = logits.float()
    x = x - x.amax(dim=-1, keepdim=True)  # max 0: exp(x) <= 1 and no inf - inf however small T is
    x = x / torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    s, order = torch.sort(x, dim=-1, descending=True, stable=True)
    cum = torch.exp(s).cumsum(dim=-1)  # unnormalised and monotone; the cuts below only read its prefix
    k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), vocab)
    top_k_mass = cum.gather(1, (k - 1)[:, None])
    n_top_p = (cum <= batch.top_p[:, None] * top_k_mass).sum(dim=-1) + 1  # keeps i iff mass before i <= top_p
    last = (torch.minimum(k, n_top_p) - 1)[:, None]
    target = _uniform(random_bits(batch.seed, batch.uid, batch.position))[:, None] * cum.gather(1, last)
    pick = torch.minimum(torch.searchsorted(cum, target, right=True), last)  # the first cum > target
    return order.gather(1, pick)[:, 0]
