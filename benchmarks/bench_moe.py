"""One Mixtral-8x7B MoE layer (dim 4096, hidden 14336, 8 experts, top-2, bf16, random weights) on one GPU:
the grouped path against the former per-expert loop.

    python benchmarks/bench_moe.py [--tokens 1 64 4096] [--backward-tokens 4096]

Checks first (and exits non-zero if one fails): the grouped path equals the loop, and a CUDA
graph replay of the layer equals eager with new inputs copied in. Then prints the median time
(triton's do_bench) of the loop and of the grouped path per token count, and of forward+backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import moe_expert_loop  # noqa: E402  (the former per-expert loop)

from pp_runtime.args import ModelArgs, MoeArgs  # noqa: E402
from pp_runtime.moe import MoeFeedForward, expert_token_counts, pick_backend  # noqa: E402

MIXTRAL = ModelArgs(dim=4096, n_layers=1, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                    vocab_size=32000, moe=MoeArgs(8, 2))


def layer(device: torch.device) -> MoeFeedForward:
    with torch.device(device):
        m = MoeFeedForward(MIXTRAL).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def loop(m: MoeFeedForward, x: torch.Tensor) -> torch.Tensor:
    e = m.experts
    return moe_expert_loop(x, m.gate.weight, e.w1, e.w2, e.w3, m.top_k)


def check(m: MoeFeedForward, tokens: list[int]) -> None:
    for t in tokens:
        x = torch.randn(t, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            got, ref = m(x), loop(m, x)
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
        print(f"T={t}: grouped vs loop, max |diff| / max |ref| = {err:.2e}")
        if err > 2e-2:
            sys.exit(f"grouped path differs from the loop at T={t}")
    t = max(tokens)
    static_x = torch.randn(t, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
    valid = torch.tensor(t, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m(static_x, valid)  # warm-up before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = m(static_x, valid)
        expert_token_counts(m, reset=True)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        valid.fill_(t // 2)  # the second half counts as padding
        graph.replay()
        eager = m(new_x)
    if not torch.equal(static_out, eager):
        sys.exit("CUDA graph replay differs from eager")
    counts = expert_token_counts(m)  # replay (half counted) + eager (all counted)
    if int(counts.sum()) != (t // 2 + t) * m.top_k:
        sys.exit(f"expert counts {counts.tolist()} do not add up to {(t // 2 + t) * m.top_k}")
    print(f"T={t}: CUDA graph replay equals eager; expert counts add up ({counts.tolist()})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    p.add_argument("--backward-tokens", type=int, default=4096)
    a = p.parse_args(argv)
    from triton.testing import do_bench

    torch.manual_seed(0)
    m = layer(torch.device("cuda"))
    x0 = torch.randn(1, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backend {pick_backend(x0, MIXTRAL.hidden_dim)}")
    check(m, a.tokens)
    rows = []
    with torch.no_grad():
        for t in a.tokens:
            x = torch.randn(t, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
            rows.append((f"forward T={t}", do_bench(lambda: loop(m, x)), do_bench(lambda: m(x))))
    x = torch.randn(a.backward_tokens, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def fwd_bwd(fn):
        def run():
            m.zero_grad(set_to_none=True)
            fn(m, x).backward(g)
        return run

    rows.append((f"fwd+bwd T={a.backward_tokens}", do_bench(fwd_bwd(loop)), do_bench(fwd_bwd(MoeFeedForward.__call__))))
    print(f"\n{'':24} {'loop ms':>9} {'grouped ms':>11} {'speed-up':>9}")
    for name, lo, gr in rows:
        print(f"{name:24} {lo:9.3f} {gr:11.3f} {lo / gr:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
