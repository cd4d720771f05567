"""Mistral / Mixtral decoder, built so that any contiguous range of layers can live on one stage.

Parameter names follow Mistral's consolidated checkpoints (`layers.17.attention.wq.weight`, ...),
and blocks keep their global layer id, so checkpoint keys never change when the split does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pp_runtime.model.args import ModelArgs
from pp_runtime.model.attention_meta import AttentionMeta
from pp_runtime.model.kv_cache import LayerCacheView, RollingKVCache
from pp_runtime.model.moe import MoeFeedForward
from pp_runtime.model.partition import StageSpec
from pp_runtime.model.split_linear import Linear


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in float32; float32/float64 stay as they are."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _upcast(x)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as Mistral's reference does. x: [T, H, D]."""
    xf = _upcast(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMeta,
        cache: Optional[LayerCacheView] = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.wq(x).view(t, self.n_heads, self.head_dim)
        k = self.wk(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, meta.cos, meta.sin), apply_rope(k, meta.cos, meta.sin)

        qr = meta.to_rows(q)  # [R, C, H, D]
        if cache is None:
            keys, values = meta.to_rows(k), meta.to_rows(v)
        else:
            keys, values = cache.update(k, v, meta.to_rows)
        out = self._sdpa(qr, keys, values, meta.mask)  # [R, C, H, D]
        return self.wo(meta.from_rows(out).reshape(t, self.n_heads * self.head_dim))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        r, c, h, d = q.shape
        g = h // self.n_kv_heads
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [R, Hkv, K, D]
        if mask is None:  # plain causal: fused kernels with native GQA
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)
        # Stack the G query heads of each KV head as extra query rows: no copy of K/V per head.
        qg = q.view(r, c, self.n_kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(r, self.n_kv_heads, g * c, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        return out.view(r, self.n_kv_heads, g, c, d).permute(0, 3, 1, 2, 4).reshape(r, c, h, d)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeFeedForward(args) if args.is_moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMeta, cache=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), meta, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class StageModule(nn.Module):
    """What one pipeline stage holds: embedding (first), blocks [a, b) by global id, norm + head (last)."""

    def __init__(self, args: ModelArgs, spec: StageSpec) -> None:
        super().__init__()
        self.args, self.spec = args, spec
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if spec.has_embedding else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in spec.layers})
        self.norm = RMSNorm(args.dim, args.norm_eps) if spec.has_head else None
        self.output = Linear(args.dim, args.vocab_size, bias=False) if spec.has_head else None
        self.activation_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMeta,
        cache: Optional[RollingKVCache] = None,
        logits: str = "last",
    ) -> torch.Tensor:
        """x: token ids [T] on the first stage, hidden states [T, dim] otherwise.

        Returns hidden states, or on the last stage logits for each sequence's last token
        (`logits="last"`, [R, vocab]) or for every token (`logits="all"`, [T, vocab]).
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for lid, block in self.layers.items():
            layer_cache = cache.view(int(lid), meta.cache_access) if cache is not None else None
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, meta, layer_cache, use_reentrant=False)
            else:
                h = block(h, meta, layer_cache)
        if self.output is None:
            return h
        if logits == "last":
            h = h.index_select(0, meta.last_index)
        return _upcast(self.output(self.norm(h)))
