"""The grouped MoE path against the former per-expert loop and the per-token reference, the
padded row layout the GPU kernel runs on, expert token counts, and the per-expert checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import pp_runtime.training.checkpoint as tc
from pp_runtime.checkpoints.formats import full_spec, load_stage_module
from pp_runtime.model.args import ModelArgs, MoeArgs, preset
from pp_runtime.model.attention_meta import build_training_meta
from ckpt_helpers import random_state_dict, save_hf_checkpoint
from pp_runtime.model.transformer import StageModule
from pp_runtime.model.moe import (
    GROUP_ALIGN,
    ExpertLoad,
    MoeFeedForward,
    batched_layout,
    expert_counting_paused,
    expert_token_counts,
    experts_forward,
    grouped_layout,
    stack_experts_,
    unstack_experts,
)
from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.checkpoints.random_weights import write_random_checkpoint
from pp_runtime.model.partition import plan_for
from reference import _moe, moe_expert_loop

ARGS = preset("tiny-moe")  # dim 64, hidden 96, 8 experts, top-2
BACKENDS = ["loop", "bmm"]  # CPU: the grouped layout through the emulated grouped_mm; the GPU fallback


def _layer(seed: int = 0) -> MoeFeedForward:
    torch.manual_seed(seed)
    m = MoeFeedForward(ARGS).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _x(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, ARGS.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _all_to_experts(m: MoeFeedForward, x: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """Gate weights that send every token to `first` and `second` (every other expert idle)."""
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[first, 0], m.gate.weight[second, 0] = 2.0, 1.0
    x = x.clone()
    x[:, 0] = x[:, 0].abs() + 1.0  # logits 2a > a > 0 for every token
    return x


def _forward(m: MoeFeedForward, x: torch.Tensor, backend: str) -> torch.Tensor:
    logits = m.gate(x)
    top, experts = torch.topk(logits, m.top_k, dim=-1)
    e = m.experts
    return experts_forward(x, experts, torch.softmax(top, -1), e.w1, e.w2, e.w3, backend)


def _loop(m: MoeFeedForward, x: torch.Tensor) -> torch.Tensor:
    e = m.experts
    return moe_expert_loop(x, m.gate.weight, e.w1, e.w2, e.w3, m.top_k)


def _per_token(m: MoeFeedForward, x: torch.Tensor) -> torch.Tensor:
    sd = unstack_experts({f"ffn.{k}": v.detach() for k, v in m.state_dict().items()})
    return _moe(x, sd, "ffn", ARGS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["T=1", "T=5", "T=300", "two experts take all", "skewed"])
def test_grouped_path_equals_loop_and_per_token_reference(case, backend):
    m = _layer()
    x = _x(int(case[2:]) if case.startswith("T=") else 40)
    if case == "two experts take all":
        x = _all_to_experts(m, x, 3, 5)
    elif case == "skewed":  # uneven routing: a few experts get most tokens, some none
        with torch.no_grad():
            m.gate.weight[[1, 6]] += 3 * x.mean(0)
    got = _forward(m, x, backend)
    torch.testing.assert_close(got, _loop(m, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, _per_token(m, x), rtol=1e-12, atol=1e-12)
    if backend == "loop":  # the module picks this path on CPU
        torch.testing.assert_close(m(x), got, rtol=0, atol=0)
        if case == "two experts take all":
            assert expert_token_counts(m).tolist() == [0, 0, 0, 40, 0, 40, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skew", [False, True])
def test_gradients_equal_the_loop(backend, skew):
    m = _layer(seed=2)
    x = _x(33, seed=3)
    if skew:
        x = _all_to_experts(m, x, 0, 7)
    weights = [m.gate.weight, m.experts.w1, m.experts.w2, m.experts.w3]
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads(fn):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad((fn(xi) * grad_out).sum(), [xi, *weights], allow_unused=True)

    ours, ref = grads(lambda xi: _forward(m, xi, backend)), grads(lambda xi: _loop(m, xi))
    for name, a, b in zip(["x", "gate", "w1", "w2", "w3"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, n=name: f"grad of {n}: {s}")
    if skew:  # idle experts get exact zeros, not missing gradients
        assert ours[2][1:7].abs().max() == 0


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_layout_runs_on_torch_grouped_mm():
    """The real `torch._grouped_mm` (its CPU kernel, float32) on our padded layout equals the loop."""
    m = _layer(seed=5).float()
    x = _x(70, seed=6).float()
    ref = _loop(m, x)
    torch.testing.assert_close(_forward(m, x, "grouped_mm"), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 7, 64])
def test_grouped_layout_pads_each_expert_to_aligned_groups(n_tokens):
    k, n_exp = 2, 8
    gen = torch.Generator().manual_seed(n_tokens)
    experts = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tokens)])
    experts[: n_tokens // 2] = torch.tensor([2, 6])  # uneven: half the tokens on two experts
    flat = experts.reshape(-1)
    layout = grouped_layout(flat, n_exp)
    assert layout.n_rows % GROUP_ALIGN == 0 and layout.n_rows >= n_tokens * k + n_exp * (GROUP_ALIGN - 1)
    ends = layout.offs.tolist()
    starts = [0] + ends[:-1]
    counts = torch.bincount(flat, minlength=n_exp).tolist()
    for e in range(n_exp):  # aligned starts, the expert's pairs first in flat order, padding after
        assert starts[e] % GROUP_ALIGN == 0 and ends[e] - starts[e] == -(-counts[e] // GROUP_ALIGN) * GROUP_ALIGN
        mine = (flat == e).nonzero().flatten()
        assert layout.rows[mine].tolist() == list(range(starts[e], starts[e] + counts[e]))
    assert ends[-1] <= layout.n_rows and len(set(layout.rows.tolist())) == flat.numel()
    cap = batched_layout(flat, n_exp, n_tokens)
    assert sorted(cap.rows.tolist()) == sorted(e * n_tokens + r for e in range(n_exp) for r in range(counts[e]))


def test_expert_counts_equal_bincount_of_the_routing():
    m = _layer(seed=7)
    xs = [_x(t, seed=t) for t in (9, 30)]
    for x in xs:
        m(x)
    ref = sum(torch.bincount(torch.topk(x @ m.gate.weight.detach().T, 2).indices.flatten(), minlength=8) for x in xs)
    assert expert_token_counts(m).tolist() == ref.tolist()
    m(xs[1], valid_tokens=torch.tensor(12))  # 18 padding rows: computed, not counted
    ref += torch.bincount(torch.topk(xs[1][:12] @ m.gate.weight.detach().T, 2).indices.flatten(), minlength=8)
    assert expert_token_counts(m, reset=True).tolist() == ref.tolist()
    assert expert_token_counts(m).tolist() == [0] * 8
    with expert_counting_paused(m):
        m(xs[0])
    assert expert_token_counts(m).sum() == 0
    assert expert_token_counts(torch.nn.Linear(2, 2)) is None


def test_activation_checkpointing_counts_each_token_once():
    args = preset("tiny-moe", vocab_size=64, n_layers=2)
    spec = plan_for(args, 1).stages[0]
    tokens = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(0))
    meta = build_training_meta([[10, 14]], window=args.sliding_window, head_dim=args.head_dim,
                               rope_theta=args.rope_theta, n_kv_groups=args.n_heads // args.n_kv_heads)
    counts = []
    for checkpointing in (False, True):
        m = ModelSource(args, None, seed=1).build_stage(spec, torch.float64, torch.device("cpu")).train()
        m.activation_checkpointing = checkpointing
        m(tokens, meta, logits="all").sum().backward()
        counts.append(expert_token_counts(m).tolist())
    assert counts[0] == counts[1] and sum(counts[0]) == 24 * 2 * args.n_layers


def test_fine_tuning_step_reports_expert_load(tmp_path):
    from pp_runtime.distributed.parallel import init_parallel
    from pp_runtime.training.data import Document, PackedDataset
    from pp_runtime.training.schedules import build_schedule
    from pp_runtime.training.trainer import TrainConfig, Trainer

    args = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                     sliding_window=6, max_seq_len=64, moe=MoeArgs(4, 2))
    docs = [Document(list(range(3, 3 + n)), [True] * n) for n in (16, 9, 16, 12)]
    data = PackedDataset.from_documents(docs, 16, pad_id=2, shuffle=False)
    ctx = init_parallel(1, 1, "cpu")
    stage = ModelSource(args, None, seed=3).build_stage(plan_for(args, 1).stages[0], torch.float64, ctx.device)
    routed = torch.zeros(4, dtype=torch.int64)

    def count(mod, inputs, _out):  # the reference: bincount of each layer's top-2 gate logits
        routed.add_(torch.bincount(torch.topk(mod.gate(inputs[0]), 2).indices.flatten(), minlength=4))

    for block in stage.layers.values():
        block.feed_forward.register_forward_hook(count)
    trainer = Trainer(ctx, args, build_schedule("1f1b", 1, 2, 1), {0: stage}, data,
                      TrainConfig(steps=1, batch_size=4), metrics_path=tmp_path / "m.jsonl", console=False)
    stats = trainer.step()
    assert stats.expert_load == ExpertLoad.from_counts(routed, 2)
    assert stats.expert_load.mean == 4 * 16 * 2 / 4  # every token (padding too) of 4 rows, top-2 of 4
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["expert_tokens"] == stats.expert_load.to_json()
    assert "tokens/expert min" in stats.line(1)


# ---------------------------------------------------------------------------------- checkpoints
def test_random_checkpoint_equals_preset_model(tmp_path):
    """Per-expert tensors keep their name seeds: a written random checkpoint and a preset model agree."""
    args = preset("tiny-moe", n_layers=2)
    write_random_checkpoint(tmp_path, args, seed=4, dtype=torch.float32)
    loaded = load_stage_module(tmp_path, args, full_spec(args))
    built = ModelSource(args, None, seed=4).build_stage(full_spec(args), torch.float32, torch.device("cpu"))
    expected = random_state_dict(args, seed=4)
    assert loaded.layers["1"].feed_forward.experts.w2.shape == (8, args.dim, args.hidden_dim)
    for model in (loaded, built):
        state = unstack_experts(model.state_dict())
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(state[k], v), k


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_stacked_weights_round_trip_through_both_formats(tmp_path, fmt):
    args = preset("tiny-moe", n_layers=2)
    state = random_state_dict(args, seed=6)
    model = StageModule(args, full_spec(args))
    model.load_state_dict(stack_experts_(dict(state)))
    if fmt == "mistral":  # writers take the stacked layout and store experts one by one
        from ckpt_helpers import save_mistral_checkpoint

        save_mistral_checkpoint(tmp_path, args, model.state_dict())
        with safe_open(str(tmp_path / "consolidated.safetensors"), "pt") as h:
            assert set(h.keys()) == set(state)
    else:
        save_hf_checkpoint(tmp_path, args, model.state_dict())
    again = unstack_experts(load_stage_module(tmp_path, args, full_spec(args)).state_dict())
    for k, v in state.items():
        assert torch.equal(again[k], v), k


def test_training_checkpoint_stores_experts_one_by_one(tmp_path):
    args = preset("tiny-moe", n_layers=2)
    stages = plan_for(args, 2, training=True).stages
    model = StageModule(args, full_spec(args))
    model.load_state_dict(stack_experts_(random_state_dict(args, seed=8)))
    weights = dict(model.named_parameters())
    optim = {f"{n}.{s}": (p.detach() * 2 if s != "step" else torch.tensor([5.0])) for n, p in weights.items()
             for s in ("exp_avg", "exp_avg_sq", "step")}
    names = {s.index: {f"layers.{i}." for i in s.layers} for s in stages}

    def part(d, s):
        return {k: v for k, v in d.items() if any(k.startswith(p) for p in names[s]) or
                (s == 0 and k.startswith("tok_")) or (s == 1 and not k.startswith(("layers.", "tok_")))}

    ckpt = tc.save_train_checkpoint(tmp_path, step=1, shards={s: (part(weights, s), part(optim, s)) for s in (0, 1)},
                                    stages=stages, args=args)
    with safe_open(str(ckpt / tc.weights_file(0)), "pt") as h:
        assert "layers.0.feed_forward.experts.7.w3.weight" in h.keys()
        assert not any(k.endswith("experts.w3") for k in h.keys())
    loaded = tc.load_tensors(ckpt, list(weights))
    loaded_optim = tc.load_tensors(ckpt, tc.optim_keys(weights), kind="optim")
    for n, p in weights.items():
        assert torch.equal(loaded[n], p.detach()), n
        assert torch.equal(loaded_optim[f"{n}.exp_avg"], p.detach() * 2) and loaded_optim[f"{n}.step"].item() == 5
    out = tc.export_checkpoint(ckpt, tmp_path / "export")
    exported = unstack_experts(load_stage_module(out, args, full_spec(args)).state_dict())
    for k, v in unstack_experts(weights).items():
        assert torch.equal(exported[k], v.detach()), k
