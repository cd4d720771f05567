"""Fused kernels (pp_runtime.inference.fused_ops) against the eager ops of pp_runtime.model.transformer, on one GPU.

    python benchmarks/bench_fused_ops.py

Mistral 7B shapes in bf16 (dim 4096, 32/8 heads of 128, hidden 14336) at decode (T=1, 64) and
prefill (T=4096). Each kernel is first checked against eager (share of bit-identical elements and
the largest difference; it fails loudly beyond bf16 rounding), then timed by median with
triton.testing: launched eagerly, and replayed in a CUDA graph as the decode step runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.inference import fused_ops  # noqa: E402
from pp_runtime.model.attention_meta import rope_angles  # noqa: E402
from pp_runtime.model.transformer import RMSNorm, apply_rope  # noqa: E402

DIM, N_HEADS, N_KV, HEAD_DIM, HIDDEN = 4096, 32, 8, 128, 14336
EPS, THETA, MAX_POS = 1e-5, 1e6, 32768
DTYPE, DEVICE = torch.bfloat16, "cuda"
TOKENS = (1, 64, 4096)


def check(name: str, got: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (got.float() - ref.float()).abs()
    bad = diff > 2 ** -5 * ref.float().abs() + 1e-3  # a few bf16 roundings
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} of {ref.numel()} elements off, max diff {diff.max().item():.3g}")
    return f"{(got == ref).float().mean().item():.4f} exact, max diff {diff.max().item():.2g}"


def timings(eager, fused) -> list[float]:
    """Median microseconds: eager launch of eager ops, fused; then both replayed in a CUDA graph."""
    return [1e3 * bench(fn, return_mode="median") for bench in (do_bench, do_bench_cudagraph) for fn in (eager, fused)]


def cases(t: int):
    """(name, eager fn, fused fn, correctness note) for T tokens."""
    dev = DEVICE
    norm = RMSNorm(DIM, EPS).to(dev, DTYPE)
    norm.weight.data.normal_()
    x, res = torch.randn(t, DIM, device=dev, dtype=DTYPE), torch.randn(t, DIM, device=dev, dtype=DTYPE)
    normed, h = fused_ops.add_rms_norm(x, res, norm.weight, EPS)
    h_ref = x + res
    note = f"residual {check('residual', h, h_ref)}; normed {check('add_rms_norm', normed, norm(h_ref))}"
    yield "add_rms_norm", lambda: norm(x + res), lambda: fused_ops.add_rms_norm(x, res, norm.weight, EPS), note

    cos_t, sin_t = fused_ops.rope_tables(MAX_POS, HEAD_DIM, THETA, dev)
    positions = torch.randint(0, MAX_POS, (t,), device=dev)
    cos, sin = rope_angles(positions.cpu(), HEAD_DIM, THETA)
    cos, sin = cos.to(dev), sin.to(dev)
    qkv = torch.randn(t, (N_HEADS + 2 * N_KV) * HEAD_DIM, device=dev, dtype=DTYPE)
    q = qkv[:, : N_HEADS * HEAD_DIM].view(t, N_HEADS, HEAD_DIM)
    k = qkv[:, N_HEADS * HEAD_DIM : (N_HEADS + N_KV) * HEAD_DIM].view(t, N_KV, HEAD_DIM)
    q_ref, k_ref = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    fused_ops.rope_qk_(q, k, positions, cos_t, sin_t)
    note = f"q {check('rope q', q, q_ref)}; k {check('rope k', k, k_ref)}"
    # Timing keeps rotating q and k in place: a rotation keeps them well scaled.
    yield ("rope_qk_", lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
           lambda: fused_ops.rope_qk_(q, k, positions, cos_t, sin_t), note)

    gate_up = torch.randn(t, 2 * HIDDEN, device=dev, dtype=DTYPE)
    a, b = gate_up[:, :HIDDEN].contiguous(), gate_up[:, HIDDEN:].contiguous()  # eager: two matmul outputs
    note = f"vs eager {check('silu_mul', fused_ops.silu_mul(gate_up), F.silu(a) * b)}"
    yield "silu_mul", lambda: F.silu(a) * b, lambda: fused_ops.silu_mul(gate_up), note


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; median us")
    print(f"{'op':<13} {'T':>5} {'eager':>8} {'fused':>8} {'x':>5} | {'graph eager':>11} {'graph fused':>11} {'x':>5}  check")
    for t in TOKENS:
        for name, eager, fused, note in cases(t):
            e, f, ge, gf = timings(eager, fused)
            print(f"{name:<13} {t:>5} {e:>8.1f} {f:>8.1f} {e / f:>5.1f} | {ge:>11.1f} {gf:>11.1f} {ge / gf:>5.1f}  {note}")


if __name__ == "__main__":
    main()
