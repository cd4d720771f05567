"""An independent, deliberately naive Mistral/Mixtral forward: one sequence, full attention matrix,
explicit window mask, complex-number RoPE, per-token MoE loop. Shares no code with pp_runtime.model.transformer."""

from __future__ import annotations

from typing import Optional

import torch


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [L, H, D]: rotate consecutive pairs as complex numbers by pos * theta^(-2i/D)."""
    length, _, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    xc = torch.view_as_complex(x.double().reshape(length, x.shape[1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape)


def _ffn(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    h = torch.nn.functional.silu(x @ sd[f"{prefix}.w1.weight"].T) * (x @ sd[f"{prefix}.w3.weight"].T)
    return h @ sd[f"{prefix}.w2.weight"].T


def naive_logits(args, sd: dict, tokens: list[int], window: Optional[int] = None) -> torch.Tensor:
    """Logits [L, vocab] in float64 for one sequence (window defaults to args.sliding_window)."""
    sd = {k: v.double() for k, v in sd.items()}
    window = args.sliding_window if window is None else window
    length = len(tokens)
    h = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    group = args.n_heads // args.n_kv_heads
    for layer in range(args.n_layers):
        p = f"layers.{layer}"
        x = _rms(h, sd[f"{p}.attention_norm.weight"], args.norm_eps)
        q = (x @ sd[f"{p}.attention.wq.weight"].T).view(length, args.n_heads, args.head_dim)
        k = (x @ sd[f"{p}.attention.wk.weight"].T).view(length, args.n_kv_heads, args.head_dim)
        v = (x @ sd[f"{p}.attention.wv.weight"].T).view(length, args.n_kv_heads, args.head_dim)
        q, k = _rope(q, args.rope_theta), _rope(k, args.rope_theta)
        out = torch.empty_like(q)
        for head in range(args.n_heads):
            kv = head // group
            scores = (q[:, head] @ k[:, kv].T) / args.head_dim**0.5
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, head] = torch.softmax(scores, -1) @ v[:, kv]
        h = h + out.reshape(length, -1) @ sd[f"{p}.attention.wo.weight"].T
        x = _rms(h, sd[f"{p}.ffn_norm.weight"], args.norm_eps)
        h = h + (_moe(x, sd, f"{p}.feed_forward", args) if args.moe else _ffn(x, sd, f"{p}.feed_forward"))
    return _rms(h, sd["norm.weight"], args.norm_eps) @ sd["output.weight"].T


def _moe(x: torch.Tensor, sd: dict, prefix: str, args) -> torch.Tensor:
    """Per token: softmax over the top-k gate logits, weighted sum of those experts."""
    out = torch.zeros_like(x)
    gate = x @ sd[f"{prefix}.gate.weight"].T
    for t in range(x.shape[0]):
        top = torch.topk(gate[t], args.moe.num_experts_per_tok)
        weights = torch.softmax(top.values, -1)
        for w, e in zip(weights, top.indices.tolist()):
            out[t] += w * _ffn(x[t : t + 1], sd, f"{prefix}.experts.{e}")[0]
    return out


def naive_greedy(args, sd: dict, prompt: list[int], n_new: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step (no cache at all)."""
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(naive_logits(args, sd, seq)[-1].argmax()))
    return seq[len(prompt):]


def moe_expert_loop(x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                    top_k: int) -> torch.Tensor:
    """The former per-expert MoE loop (host-side counts, one matmul chain per expert with tokens), on
    stacked weights [E, out, in] so gradients reach them; float32 softmax for half inputs."""
    logits = x @ gate.T
    top_logits, top_idx = torch.topk(logits, top_k, dim=-1)
    upcast = top_logits.float() if top_logits.element_size() < 4 else top_logits
    weights = torch.softmax(upcast, dim=-1).type_as(x)
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    token_of = order // top_k
    out = torch.zeros_like(x)
    begin = 0
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        idx, tok = order[begin:begin + cnt], token_of[begin:begin + cnt]
        xe = x.index_select(0, tok)
        y = (torch.nn.functional.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T
        out = out.index_add(0, tok, y * weights.reshape(-1, 1).index_select(0, idx))
        begin += cnt
    return out
