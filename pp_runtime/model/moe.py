"""Mixtral's sparse feed-forward: top-k routing and all experts in three grouped matmuls.

Every shape depends only on the number of tokens, never on the routing, and nothing reads device
values on the host, so a MoE step can be captured as a CUDA graph like a dense one:

- each (token, choice) pair gets a row of a padded, expert-sorted buffer, computed on the device
  from a cumulative sum (`grouped_layout`); each expert's rows start at a multiple of 16 (what
  the grouped GEMM's TMA loads need) and the buffer has the worst-case size T*k + E*15 rounded up;
- the three expert matmuls are `torch._grouped_mm` over those row groups (bf16 on sm90/sm100),
  a batched matmul over a fixed per-expert capacity of T rows elsewhere on CUDA (`batched_layout`,
  E/k times the FLOPs), and on CPU a loop over the groups (`grouped_mm_loop`, exact, float64 too);
- the outputs are gathered back per (token, choice) and summed with the routing weights.

At decode (at most `GEMV_MAX_TOKENS` rows, inference only, CUDA with Triton) the "gemv" backend
runs instead: two Triton kernels (pp_runtime.model.moe_gemv) that read only the experts some real token
was routed to, where grouped_mm streams all E experts' weights whatever the routing (at one token,
top-2 of 8: 2 experts' bytes instead of 8).

Experts are stacked per layer (`experts.w1: [E, hidden, dim]`, ...), while checkpoints keep one
tensor per expert (`experts.3.w1.weight`), as Mistral and Hugging Face write them:
`unstack_experts` / `stack_experts_` convert between the two.

Each layer also counts the tokens routed to each expert in a device buffer (`expert_token_counts`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pp_runtime.errors import CheckpointError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.split_linear import Linear

GROUP_ALIGN = 16  # rows per expert group: torch's grouped GEMM asserts group sizes of 16-byte multiples
# Most rows for the routed-experts ("gemv") backend. It reads the union of the routed experts' weights,
# grouped_mm all E of them; with T tokens routed at random that union is E (1 - (1 - k/E)^T) experts
# (Mixtral: 2, 3.5, 5.5, 7.2, 7.9 of 8 for T = 1, 2, 4, 8, 16), so the saving is gone by T = 16, where
# grouped_mm's tensor-core GEMM becomes the better kernel. 16 is also the fast path's smallest token
# bucket: a decode step of a few sequences is 16 rows, the padding ones routed nowhere (`valid_tokens`).
GEMV_MAX_TOKENS = 16
GEMV_DTYPES = (torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------- routing layouts


@dataclass(frozen=True)
class GroupLayout:
    """Where each (token, choice) pair sits in the expert-sorted buffer the matmuls run on."""

    rows: torch.Tensor  # [T*k] int64: buffer row of flat pair t*k + j
    offs: Optional[torch.Tensor]  # [E] int32 cumulative group ends (grouped layout); None for batched
    n_rows: int  # buffer rows (fixed by T, k and E)


def _rank_in_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat expert ids [N]: each pair's 0-based rank among the pairs of its expert (in flat order),
    and the pair count per expert [E]. One-hot cumsum on the device: no sort, no host sync."""
    one_hot = (experts[:, None] == torch.arange(n_experts, device=experts.device)).long()  # [N, E]
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    return rank, one_hot.sum(0)


def grouped_layout(experts: torch.Tensor, n_experts: int, align: int = GROUP_ALIGN) -> GroupLayout:
    """Expert groups back to back, each padded to a multiple of `align` rows (empty experts take none).

    The buffer has the worst case's rows, N + E*(align-1) rounded up to `align`; rows after the last
    group's end belong to no group (a grouped matmul leaves them undefined and nothing reads them)."""
    rank, counts = _rank_in_expert(experts, n_experts)
    padded = (counts + align - 1) // align * align
    ends = padded.cumsum(0)
    rows = (ends - padded)[experts] + rank
    n_rows = -(-(experts.numel() + n_experts * (align - 1)) // align) * align
    return GroupLayout(rows, ends.to(torch.int32), n_rows)


def batched_layout(experts: torch.Tensor, n_experts: int, capacity: int) -> GroupLayout:
    """Expert e owns rows [e*capacity, (e+1)*capacity); `capacity` = T holds any routing (top-k
    picks distinct experts), so the buffer reshapes to [E, capacity, dim] for a plain bmm."""
    rank, _ = _rank_in_expert(experts, n_experts)
    return GroupLayout(experts * capacity + rank, None, n_experts * capacity)


# ---------------------------------------------------------------------------------- matmul backends
def grouped_mm_loop(a: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What `torch._grouped_mm(a, w_t, offs=offs)` computes, one group at a time (reads offs on the host).

    Rows after the last group are NaN: the device kernel leaves them undefined, so any use shows."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    parts = [a[s:e] @ w for w, s, e in zip(w_t.unbind(0), starts, ends)]  # unbind: one stack in backward
    parts.append(a.new_full((a.shape[0] - ends[-1], w_t.shape[-1]), float("nan")))
    return torch.cat(parts)


@functools.lru_cache(maxsize=None)
def _has_grouped_gemm(device: torch.device) -> bool:
    """sm90 / sm100 run `torch._grouped_mm` as one CUTLASS kernel with no host sync (other GPUs
    fall back to a loop that reads the group sizes on the host)."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] in (9, 10)


def uses_grouped_gemm(x: torch.Tensor, hidden_dim: int) -> bool:
    """Whether the CUDA path runs on `torch._grouped_mm`: bf16 on Hopper/Blackwell, 16-byte rows."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and hidden_dim % 8 == 0
            and _has_grouped_gemm(x.device))


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_gemv(x: torch.Tensor, needs_grad: bool = False) -> bool:
    """Whether the routed-experts kernels run: CUDA, bf16/fp16 rows with unit stride, at most
    `GEMV_MAX_TOKENS` of them, Triton installed, and no gradient wanted (they have no backward)."""
    return (x.is_cuda and not needs_grad and x.dim() == 2 and x.shape[0] <= GEMV_MAX_TOKENS
            and x.dtype in GEMV_DTYPES and x.stride(-1) == 1 and _has_triton())


def pick_backend(x: torch.Tensor, hidden_dim: int, needs_grad: bool = False) -> str:
    """"loop" on CPU; on CUDA "gemv" at decode sizes (`uses_gemv`), else "grouped_mm" where
    `uses_grouped_gemm`, else "bmm". `needs_grad`: autograd will want gradients through the experts."""
    if x.device.type == "cpu":
        return "loop"
    if uses_gemv(x, needs_grad):
        return "gemv"
    return "grouped_mm" if uses_grouped_gemm(x, hidden_dim) else "bmm"


def experts_forward(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    backend: str,
    valid_tokens: Optional[torch.Tensor | int] = None,
    adapters: Optional[Mapping[str, Callable]] = None,
) -> torch.Tensor:
    """sum_j weights[t, j] * w2_e(silu(w1_e x_t) * w3_e x_t) with e = experts[t, j]: x [T, dim],
    experts / weights [T, k], stacked w* [E, out, in]. `backend`: see `pick_backend`.

    `valid_tokens` (an int or a 0-d device tensor): only the leading rows are real tokens. The
    "gemv" backend routes the others nowhere (their rows are zeros, and their experts are not read);
    the other backends compute every row.

    `adapters` ("w1" / "w2" / "w3" -> f(rows, mm)) adds f's output to that projection (LoRA,
    `pp_runtime.training.lora.ExpertLora`), computed with the same grouped matmul on the same rows; the
    "gemv" backend takes none."""
    if backend == "gemv":
        from pp_runtime.model.moe_gemv import routed_experts_forward

        assert not adapters, "the gemv backend has no LoRA adapters: merge them first"
        return routed_experts_forward(x, experts, weights, w1, w2, w3, valid_tokens)
    t, k = experts.shape
    n_experts, dim = w1.shape[0], x.shape[-1]
    flat = experts.reshape(-1)
    if backend == "bmm":
        layout = batched_layout(flat, n_experts, t)

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.bmm(a.view(n_experts, t, a.shape[-1]), w.transpose(-2, -1)).flatten(0, 1)
    else:
        layout = grouped_layout(flat, n_experts)
        gmm = grouped_mm_loop if backend == "loop" else torch._grouped_mm

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return gmm(a, w.transpose(-2, -1), offs=layout.offs)

    if adapters:
        base_mm = mm

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: F811 - the same, plus the adapter
            out = base_mm(a, w)
            name = "w1" if w is w1 else "w2" if w is w2 else "w3" if w is w3 else None
            return out if name not in adapters else out + adapters[name](a, base_mm)

    pairs = x.unsqueeze(1).expand(t, k, dim).reshape(t * k, dim)
    buf = x.new_zeros(layout.n_rows, dim).index_copy(0, layout.rows, pairs)
    h = F.silu(mm(buf, w1)) * mm(buf, w3)
    y = mm(h, w2).index_select(0, layout.rows).view(t, k, dim)
    return (y * weights.unsqueeze(-1)).sum(1)


# ---------------------------------------------------------------------------------- the layer
class GroupedExperts(nn.Module):
    """The E SwiGLU experts of one layer, stacked: w1, w3 [E, hidden, dim], w2 [E, dim, hidden]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in (self.w1, self.w2, self.w3):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)


class MoeFeedForward(nn.Module):
    """Sparse MoE: top-k experts per token, softmax over the selected gate logits (float32 for half inputs)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        self.n_experts, self.top_k, self.hidden_dim = args.moe.num_experts, args.moe.num_experts_per_tok, args.hidden_dim
        self.gate = Linear(args.dim, self.n_experts, bias=False)
        self.experts = GroupedExperts(self.n_experts, args.dim, args.hidden_dim)
        self.counting = True
        # tokens routed to each expert since the last reset; made at the first forward, on its device
        # (so a CUDA graph is captured after one eager warm-up step, as DecodeGraphs does)
        self.register_buffer("expert_tokens", None, persistent=False)

    def forward(self, x: torch.Tensor, valid_tokens: Optional[torch.Tensor | int] = None) -> torch.Tensor:
        """x: [T, dim]. `valid_tokens`: how many leading rows are real tokens (the rest is padding of
        a fixed-shape step, computed but not counted); a 0-d device tensor keeps graph replays exact."""
        logits = self.gate(x)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        upcast = top_logits.float() if top_logits.element_size() < 4 else top_logits
        weights = F.softmax(upcast, dim=-1).type_as(x)
        self._count(experts, valid_tokens)
        e = self.experts
        adapters = {w: getattr(e, f"lora_{w}") for w in ("w1", "w2", "w3") if hasattr(e, f"lora_{w}")}
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in (x, e.w1, e.w2, e.w3))
        backend = pick_backend(x, self.hidden_dim, needs_grad or bool(adapters))  # adapters: not on gemv
        return experts_forward(x, experts, weights, e.w1, e.w2, e.w3, backend, valid_tokens, adapters or None)

    def _count(self, experts: torch.Tensor, valid_tokens: Optional[torch.Tensor | int]) -> None:
        # an activation-checkpointing recompute runs inside backward: its tokens were counted already
        if not self.counting or torch._C._current_graph_task_id() != -1:
            return
        if self.expert_tokens is None or self.expert_tokens.device != experts.device:
            with torch.inference_mode(False):  # a normal tensor: updatable inside and outside inference mode
                self.expert_tokens = torch.zeros(self.n_experts, dtype=torch.int64, device=experts.device)
        ones = torch.ones_like(experts)
        if valid_tokens is not None:
            ones = ones * (torch.arange(experts.shape[0], device=experts.device) < valid_tokens).unsqueeze(1)
        self.expert_tokens.scatter_add_(0, experts.reshape(-1), ones.reshape(-1))


# ---------------------------------------------------------------------------------- expert load
def moe_layers(module: nn.Module) -> list[MoeFeedForward]:
    return [m for m in module.modules() if isinstance(m, MoeFeedForward)]


def expert_token_counts(module: nn.Module, reset: bool = False) -> Optional[torch.Tensor]:
    """Tokens routed to each expert, summed over `module`'s MoE layers ([E] int64, on their device;
    None without MoE layers). Reading it syncs; `reset` zeroes the counters in place (graph-safe)."""
    layers = moe_layers(module)
    if not layers:
        return None
    counted = [m.expert_tokens for m in layers if m.expert_tokens is not None]
    if not counted:
        device = layers[0].gate.weight.device
        return torch.zeros(layers[0].n_experts, dtype=torch.int64, device=device)
    total = torch.stack(counted).sum(0)
    if reset:
        for c in counted:
            c.zero_()
    return total


@contextmanager
def expert_counting_paused(module: nn.Module) -> Iterator[None]:
    """Forwards inside (e.g. warm-up runs before a graph capture) are not counted."""
    layers = moe_layers(module)
    for m in layers:
        m.counting = False
    try:
        yield
    finally:
        for m in layers:
            m.counting = True


@dataclass(frozen=True)
class ExpertLoad:
    """Tokens per expert per MoE layer (the layers' counts averaged): with even routing every expert
    gets tokens * k / E; max / mean shows the imbalance."""

    min: float
    mean: float
    max: float

    @classmethod
    def from_counts(cls, counts: torch.Tensor, n_moe_layers: int) -> "ExpertLoad":
        per_layer = counts.double().cpu() / max(n_moe_layers, 1)
        return cls(float(per_layer.min()), float(per_layer.mean()), float(per_layer.max()))

    def to_json(self) -> dict:
        return {"min": round(self.min, 2), "mean": round(self.mean, 2), "max": round(self.max, 2)}

    def line(self) -> str:
        return f"tokens/expert min {self.min:,.0f} mean {self.mean:,.0f} max {self.max:,.0f}"


# ---------------------------------------------------------------------------------- checkpoint names
_STACKED_RE = re.compile(r"^(.*\.experts)\.(w[123])(\.[a-z_]+)?$")  # layers.0.feed_forward.experts.w1[.exp_avg]
_PER_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight(\.[a-z_]+)?$")  # ...experts.3.w1.weight[.exp_avg]

def per_expert_names(name: str, n_experts: int) -> list[str]:
    """A stacked name's checkpoint names (`experts.w1` -> `experts.0.w1.weight`, ...); others unchanged.
    A suffix (`.exp_avg` of optimizer state) carries over."""
    m = _STACKED_RE.match(name)
    if m is None:
        return [name]
    prefix, w, suffix = m.group(1), m.group(2), m.group(3) or ""
    return [f"{prefix}.{e}.{w}.weight{suffix}" for e in range(n_experts)]


def unstack_experts(state: Mapping[str, torch.Tensor], n_experts: Optional[int] = None) -> dict[str, torch.Tensor]:
    """In-memory layout -> checkpoint layout: each stacked [E, out, in] tensor becomes E views under
    per-expert names; other entries pass through. Stacked-name entries without the expert dimension
    (an optimizer's step count) are repeated for each of `n_experts` experts."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if _STACKED_RE.match(name) is None:
            out[name] = t
        elif t.dim() == 3:
            out.update(zip(per_expert_names(name, t.shape[0]), t.unbind(0)))
        elif n_experts:
            out.update((n, t.clone()) for n in per_expert_names(name, n_experts))  # files reject shared tensors
        else:
            raise ValueError(f"{name}: shape {tuple(t.shape)} has no expert dimension; pass n_experts")
    return out


def stack_experts_(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint layout -> in-memory layout, in place: per-expert entries are replaced by one stacked
    entry per (layer, weight), each removed as soon as it is copied, so a stage being loaded holds at
    most one stacked tensor twice. Entries without an expert dimension (step counts) take expert 0's."""
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for name in list(state):
        m = _PER_EXPERT_RE.match(name)
        if m is not None:
            groups.setdefault((m.group(1), m.group(3), m.group(4) or ""), {})[int(m.group(2))] = name
    for (prefix, w, suffix), by_expert in groups.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            missing = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
            raise CheckpointError(f"{prefix}.{w}: experts {missing} are missing while others are present")
        parts = [state.pop(by_expert[e]) for e in range(len(by_expert))]
        state[f"{prefix}.{w}{suffix}"] = torch.stack(parts) if parts[0].dim() == 2 else parts[0]
    return state
