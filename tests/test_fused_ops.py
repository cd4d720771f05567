"""Fused Triton kernels (pp_runtime.inference.fused_ops) against the eager math of pp_runtime.model.transformer.

The kernels run on CPU through Triton's interpreter, in one child process started with
TRITON_INTERPRET=1 (the variable must be set before Triton defines the kernels, and must not leak
into the other tests, whose CPU runs take the torch path). In the child the torch fallbacks are
replaced by functions that raise, so a check passes only if the Triton kernel ran.

Dtypes: float32 is checked tightly; float16 exactly or to one ulp, which checks the rounding order
(the interpreter rounds fp16 to nearest even, as GPUs do); bfloat16 to a few bf16 ulps only,
because Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest (the GPU benchmark,
benchmarks/bench_fused_ops.py, checks bf16 rounding on the device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pp_runtime.inference import fused_ops
from pp_runtime.model.attention_meta import rope_angles
from pp_runtime.model.transformer import RMSNorm, apply_rope

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-5
THETA = 1e6


def _ulp(dtype: torch.dtype, ref: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of `ref` (elementwise) in `dtype`."""
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    mag = ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - mant)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, exact_frac: float | None = None) -> None:
    """float32: 1e-5 relative; float16: one ulp, bit-exact on `exact_frac` of elements; bfloat16: 4 ulps.

    bfloat16 allows one ulp for each of the (truncating, in the interpreter) casts a value goes through.
    """
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    diff = (got.float() - ref.float()).abs()
    if got.dtype == torch.float32:
        bound = 1e-5 * ref.abs() + 1e-6
    else:
        bound = _ulp(got.dtype, ref) * (1 if got.dtype == torch.float16 else 4)
    bad = diff > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} of {got.numel()} off, max diff {diff.max().item():.3g}"
    if exact_frac is not None:
        frac = (got == ref).float().mean().item()
        assert frac >= exact_frac, f"{what}: only {frac:.3f} of elements bit-exact (want >= {exact_frac})"


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


# ---------------------------------------------------------------------------- checks (child process)


def check_add_rms_norm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    exact = 0.97 if dtype == torch.float16 else None
    for t, dim, with_residual, strided in ((5, 48, True, False), (3, 96, False, False), (4, 40, True, True)):
        norm = RMSNorm(dim, EPS).to(dtype)
        norm.weight.data = _rand(dim, dtype=dtype)
        x = _rand(t, dim + 8 if strided else dim, dtype=dtype, scale=3.0)[:, :dim]  # rows with a stride > dim
        residual = _rand(t, dim, dtype=dtype) if with_residual else None
        h_ref = x + residual if with_residual else x
        normed, h = fused_ops.add_rms_norm(x, residual, norm.weight.data, EPS)
        what = f"add_rms_norm {dtype} T={t} dim={dim} residual={with_residual}"
        if with_residual:
            _assert_close(h, h_ref, what + " residual_out", exact_frac=1.0 if dtype == torch.float16 else None)
        else:
            assert h is x
        _assert_close(normed, norm(h_ref), what, exact_frac=exact)
    # leading dims are flattened
    x = _rand(2, 3, 48, dtype=dtype)
    w = _rand(48, dtype=dtype)
    norm = RMSNorm(48, EPS).to(dtype)
    norm.weight.data = w
    _assert_close(fused_ops.add_rms_norm(x, None, w, EPS)[0], norm(x), f"add_rms_norm {dtype} [2, 3, 48]")


def check_rope_qk(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    exact = 1.0 if dtype == torch.float16 else None
    for t, n_q, n_kv, d, pos_dtype in ((7, 4, 2, 16, torch.int64), (3, 3, 1, 24, torch.int32), (1, 8, 2, 32, torch.int64)):
        max_pos = 4096
        cos_t, sin_t = fused_ops.rope_tables(max_pos, d, THETA, "cpu")
        qkv = _rand(t, (n_q + 2 * n_kv) * d, dtype=dtype, scale=2.0)  # fused projection output, split into views
        q = qkv[:, : n_q * d].view(t, n_q, d)
        k = qkv[:, n_q * d : (n_q + n_kv) * d].view(t, n_kv, d)
        v_before = qkv[:, (n_q + n_kv) * d :].clone()
        positions = torch.randint(0, max_pos, (t,), dtype=pos_dtype)
        positions[0] = max_pos - 1
        cos, sin = rope_angles(positions, d, THETA)
        q_ref, k_ref = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        fused_ops.rope_qk_(q, k, positions, cos_t, sin_t)
        what = f"rope_qk_ {dtype} T={t} H={n_q} Hkv={n_kv} D={d}"
        _assert_close(q, q_ref, what + " q", exact_frac=exact)
        _assert_close(k, k_ref, what + " k", exact_frac=exact)
        assert torch.equal(qkv[:, (n_q + n_kv) * d :], v_before), what + ": v was written"


def check_silu_mul(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    for t, f, pad in ((5, 40, 0), (2, 96, 6), (1, 1100, 0)):  # 1100 > one 1024-wide block
        gate_up = _rand(t, 2 * f + pad, dtype=dtype, scale=4.0)[:, : 2 * f]
        a, b = gate_up[:, :f], gate_up[:, f:]
        got = fused_ops.silu_mul(gate_up)
        what = f"silu_mul {dtype} T={t} F={f}"
        if dtype == torch.float32:
            _assert_close(got, F.silu(a) * b, what)
        else:  # one rounding of the fp32 result, hence within one rounding of eager's two
            _assert_close(got, (F.silu(a.float()) * b.float()).to(dtype), what + " vs fp32",
                          exact_frac=0.97 if dtype == torch.float16 else None)
            diff = (got.float() - (F.silu(a) * b).float()).abs()
            assert (diff <= 2 * _ulp(dtype, got)).all(), what + " vs eager"


CHECKS = {
    f"{fn.__name__.removeprefix('check_')}[{str(dt).removeprefix('torch.')}]": (fn, dt)
    for fn in (check_add_rms_norm, check_rope_qk, check_silu_mul)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
}


def _no_fallback(*_args, **_kw):
    raise AssertionError("the torch fallback ran instead of the Triton kernel")


def _run_checks_in_interpreter() -> None:
    """Child process entry: run every check with the torch fallbacks disabled, print one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    fused_ops._add_rms_norm_torch = fused_ops._rope_qk_torch = fused_ops._silu_mul_torch = _no_fallback
    results = {}
    for name, (fn, dtype) in CHECKS.items():
        try:
            fn(dtype)
            results[name] = "ok"
        except Exception as exc:  # reported per check by the parent
            results[name] = f"{type(exc).__name__}: {exc}"
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_matches_eager(interpreter_results, name):
    assert interpreter_results[name] == "ok", interpreter_results[name]


# ---------------------------------------------------------------------------- in-process (torch path)


@pytest.mark.parametrize("name", [n for n in CHECKS if "float32" in n or "bfloat16" in n])
def test_cpu_fallback_matches_eager(name, monkeypatch):
    """Without CUDA or the interpreter the wrappers run plain torch: same checks, no Triton."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused_ops, "_kernels", _no_fallback)
    fn, dtype = CHECKS[name]
    fn(dtype)


def test_rope_tables_rows_equal_rope_angles():
    cos_t, sin_t = fused_ops.rope_tables(5000, 128, THETA, "cpu")
    positions = torch.tensor([0, 1, 17, 4095, 4999])
    cos, sin = rope_angles(positions, 128, THETA)
    assert cos_t.dtype == torch.float32 and cos_t.shape == (5000, 64)
    assert torch.equal(cos_t[positions], cos) and torch.equal(sin_t[positions], sin)


def test_autograd_takes_the_differentiable_path(monkeypatch):
    """Kernels have no backward: with a gradient needed the wrappers must run torch, whatever the device."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused_ops, "_kernels", _no_fallback)
    norm = RMSNorm(32, EPS)
    norm.weight.data.normal_()
    x = torch.randn(3, 32, requires_grad=True)
    residual = torch.randn(3, 32)
    normed, h = fused_ops.add_rms_norm(x, residual, norm.weight, EPS)
    (normed.square().sum() + h.sum()).backward()
    grads = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    h_ref = x + residual
    (norm(h_ref).square().sum() + h_ref.sum()).backward()
    assert torch.allclose(grads[0], x.grad) and torch.allclose(grads[1], norm.weight.grad)
    gate_up = torch.randn(2, 16, requires_grad=True)
    fused_ops.silu_mul(gate_up).sum().backward()
    assert gate_up.grad is not None


def test_kernel_paths_reject_bad_layouts(monkeypatch):
    """Shape and layout errors are caught before any launch (no Triton needed to see them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused_ops, "_kernels", _no_fallback)
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="unit stride"):
        fused_ops.add_rms_norm(x.t(), None, torch.ones(4), EPS)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.add_rms_norm(x, None, torch.ones(32, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_ops.add_rms_norm(x, torch.randn(4, 31), torch.ones(32), EPS)
    cos_t, sin_t = fused_ops.rope_tables(16, 8, THETA, "cpu")
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="positions"):
        fused_ops.rope_qk_(q, k, torch.zeros(2), cos_t, sin_t)
    with pytest.raises(ValueError, match="cos_table"):
        fused_ops.rope_qk_(q, k, torch.zeros(2, dtype=torch.long), cos_t.double(), sin_t)
    with pytest.raises(ValueError, match="unit stride"):
        fused_ops.rope_qk_(torch.randn(2, 4, 16)[..., ::2], k, torch.zeros(2, dtype=torch.long), cos_t, sin_t)
    with pytest.raises(ValueError, match="gate_up"):
        fused_ops.silu_mul(torch.randn(3, 7))


if __name__ == "__main__":
    _run_checks_in_interpreter()
