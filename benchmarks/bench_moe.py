"""One Mixtral-8x7B MoE layer (dim 4096, hidden 14336, 8 experts, top-2, bf16, random weights) on one GPU:
the grouped path against the former per-expert loop.

    python benchmarks/bench_moe.py [--tokens 1 64 4096] [--backward-tokens 4096]

Checks first (and exits non-zero if one fails): the grouped path equals the loop, and a CUDA
graph replay of the layer equals eager with new inputs copied in. Then prints the median time
(triton's do_bench) of the loop and of the module's path per token count (the routed-experts
"gemv" kernels at <= 16 tokens), and of forward+backward.

    python benchmarks/bench_moe.py --gemv [--gemv-tokens 1 2 4 8 16] [--sweep]

The decode comparison instead: the expert part of the layer (`experts_forward`, same routing for
both) by the routed-experts kernels against grouped_mm (bmm where it is not available), each
captured in a CUDA graph and timed by replay (do_bench, L2 flushed between replays), at each T
and at a 16-row step with one real token (the fast path's batch-1 decode bucket). Checks first
that gemv equals grouped_mm and that its graph replay with a new routing equals eager. Prints per
T the distinct routed experts, both times, the speed-up, the HBM bandwidth each achieves on the
bytes it must read (gemv: routed experts; grouped_mm: all 8) and gemv's floor at the GPU's peak
bandwidth. `--sweep` also times a few fixed tile configurations of the gemv kernels at T=1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import moe_expert_loop  # noqa: E402  (the former per-expert loop)

from pp_runtime.model.args import ModelArgs, MoeArgs  # noqa: E402
from pp_runtime.model.moe import MoeFeedForward, expert_token_counts, pick_backend  # noqa: E402

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


# ---------------------------------------------------------------------------------- decode: gemv vs grouped_mm
PEAK_TBPS = {"H200": 4.8, "H100": 3.35, "H800": 3.35, "H20": 4.0, "B200": 8.0}  # HBM, by device name


def routing(m: MoeFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        top, experts = torch.topk(m.gate(x), m.top_k, dim=-1)
    return experts, torch.softmax(top.float(), -1).to(x.dtype)


def graphed(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn() captured after a warm-up on a side stream (compiles the Triton kernels outside capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def gemv_main(m: MoeFeedForward, tokens: list[int], sweep: bool) -> int:
    from triton.testing import do_bench

    from pp_runtime.model.moe import experts_forward, uses_grouped_gemm
    from pp_runtime.model.moe_gemv import GemvBlocks, routed_expert_bytes, routed_experts_forward

    e, dim, hidden = m.experts, MIXTRAL.dim, MIXTRAL.hidden_dim
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TBPS.items() if k in name), None)
    x1 = torch.zeros(1, dim, device="cuda", dtype=torch.bfloat16)
    base = "grouped_mm" if uses_grouped_gemm(x1, hidden) else "bmm"
    print(f"{name}, torch {torch.__version__}; expert part of one Mixtral layer, CUDA graph replay, "
          f"gemv against {base}" + (f"; floor at {peak} TB/s peak HBM" if peak else ""))
    cases = [(t, t) for t in tokens] + [(16, 1)]  # (rows, real tokens): the last is the fast path's B=1 step
    rows = []
    with torch.inference_mode():
        for t, n_real in cases:
            x = torch.randn(t, dim, device="cuda", dtype=torch.bfloat16)
            experts, weights = routing(m, x)
            valid = torch.tensor(n_real, device="cuda", dtype=torch.int32)

            def run_gemv():
                return experts_forward(x, experts, weights, e.w1, e.w2, e.w3, "gemv", valid)

            def run_base():
                return experts_forward(x, experts, weights, e.w1, e.w2, e.w3, base)

            ref = run_base()[:n_real].float()
            eager = run_gemv()
            err = float((eager[:n_real].float() - ref).abs().max() / ref.abs().max())
            if err > 2e-2 or (n_real < t and eager[n_real:].abs().max() != 0):
                sys.exit(f"T={t} ({n_real} real): gemv differs from {base} (max |diff| / max |ref| = {err:.2e})")
            g_gemv, out_gemv = graphed(run_gemv)
            g_base, _ = graphed(run_base)
            # the graph reads the routing from device memory: a new routing copied in gives eager's result
            new_x = torch.randn_like(x)
            new_experts, new_weights = routing(m, new_x)
            x.copy_(new_x)
            experts.copy_(new_experts)
            weights.copy_(new_weights)
            g_gemv.replay()
            if not torch.equal(out_gemv, run_gemv()):
                sys.exit(f"T={t}: gemv graph replay differs from eager")
            n_routed = int(experts[:n_real].unique().numel())
            t_gemv, t_base = do_bench(g_gemv.replay), do_bench(g_base.replay)
            label = f"T={t}" if n_real == t else f"T={t} ({n_real} real)"
            rows.append((label, n_routed, t_base, t_gemv, err))
        print(f"\n{'':16} {'experts':>7} {base + ' ms':>13} {'gemv ms':>8} {'speed-up':>9} "
              f"{base + ' TB/s':>15} {'gemv TB/s':>10} {'floor ms':>9} {'max rel diff':>13}")
        for label, n_routed, t_base, t_gemv, err in rows:
            gemv_bytes = routed_expert_bytes(n_routed, dim, hidden)
            base_bytes = routed_expert_bytes(MIXTRAL.moe.num_experts, dim, hidden)
            floor = f"{gemv_bytes / (peak * 1e12) * 1e3:9.3f}" if peak else f"{'-':>9}"
            print(f"{label:16} {n_routed:7d} {t_base:13.3f} {t_gemv:8.3f} {t_base / t_gemv:8.2f}x "
                  f"{base_bytes / t_base / 1e9:15.2f} {gemv_bytes / t_gemv / 1e9:10.2f} {floor} {err:13.1e}")
        if sweep:
            x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
            experts, weights = routing(m, x)
            configs = [GemvBlocks(), GemvBlocks(block_h=32, block_d=256), GemvBlocks(block_h=128, block_d=64),
                       GemvBlocks(block_n=16, block_k=512), GemvBlocks(block_n=64, block_k=128),
                       GemvBlocks(num_stages=4), GemvBlocks(num_stages=2, block_d=256, block_k=512),
                       GemvBlocks(num_warps=8, block_h=128, block_n=64)]
            print(f"\nT=1 tile sweep (2 experts, {routed_expert_bytes(2, dim, hidden) / 1e6:.0f} MB):")
            for c in configs:
                try:
                    g, _ = graphed(lambda: routed_experts_forward(x, experts, weights, e.w1, e.w2, e.w3, blocks=c))
                except Exception as err:  # e.g. a configuration needing more shared memory than the GPU has
                    print(f"  {c}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    continue
                ms = do_bench(g.replay)
                print(f"  {c}: {ms:.3f} ms, {routed_expert_bytes(2, dim, hidden) / ms / 1e9:.2f} TB/s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    p.add_argument("--backward-tokens", type=int, default=4096)
    p.add_argument("--gemv", action="store_true", help="decode: routed-experts kernels against grouped_mm")
    p.add_argument("--gemv-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sweep", action="store_true", help="with --gemv: time a few tile configurations at T=1")
    a = p.parse_args(argv)
    from triton.testing import do_bench

    torch.manual_seed(0)
    m = layer(torch.device("cuda"))
    if a.gemv:
        return gemv_main(m, a.gemv_tokens, a.sweep)
    x0 = torch.randn(1, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backend {pick_backend(x0, MIXTRAL.hidden_dim)}")
    check(m, a.tokens)
    rows = []
    with torch.no_grad():
        for t in a.tokens:
            x = torch.randn(t, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16)
            name = f"forward T={t} ({pick_backend(x, MIXTRAL.hidden_dim)})"
            rows.append((name, do_bench(lambda: loop(m, x)), do_bench(lambda: m(x))))
    x = torch.randn(a.backward_tokens, MIXTRAL.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def fwd_bwd(fn):
        def run():
            m.zero_grad(set_to_none=True)
            fn(m, x).backward(g)
        return run

    rows.append((f"fwd+bwd T={a.backward_tokens}", do_bench(fwd_bwd(loop)), do_bench(fwd_bwd(MoeFeedForward.__call__))))
    print(f"\n{'':32} {'loop ms':>9} {'module ms':>10} {'speed-up':>9}")
    for name, lo, gr in rows:
        print(f"{name:32} {lo:9.3f} {gr:10.3f} {lo / gr:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
