"""LoRA steps on 2 pipeline stages == the same steps written out by hand on one process, in float64.

The reference never uses pp_runtime.training.lora: it takes the whole frozen model as one StageModule and
computes every targeted weight as W + alpha/rank * B @ A from its own leaf tensors A, B
(`torch.func.functional_call`; experts as batched [E, out, r] @ [E, r, in]), then clips and runs
AdamW on A and B. The pipelined run must give the same loss, gradient norm, adapter gradients and
updated adapters, under plain, interleaved, V-shaped and B/W-split schedules, with and without
activation checkpointing, for the tiny and tiny-moe presets; the base weights never change, get no
gradient and no optimizer state, and under B/W-split schedules the adapters' weight gradients are
the ones deferred to the W actions.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.multiprocessing as mp

from pp_runtime.checkpoints.formats import full_spec
from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.distributed.parallel import shutdown
from pp_runtime.model.args import preset
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.partition import plan_for
from pp_runtime.training.data import IGNORE
from pp_runtime.training.lora import LoraConfig, apply_lora
from pp_runtime.training.schedules import build_schedule
from pp_runtime.training.trainer import TrainConfig, Trainer, lr_at, param_groups, token_loss
from dist_utils import free_port, rank_environment
from test_train_equivalence import dataset, split_bw_schedule

TINY = preset("tiny", vocab_size=64)
TINY_MOE = preset("tiny-moe", vocab_size=64)
ATTN = ("wq", "wk", "wv", "wo")
ALL = ATTN + ("w1", "w2", "w3")
MICRO = 4
STEPS = 3
CFG = TrainConfig(steps=10, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1,
                  grad_clip=0.5, betas=(0.9, 0.95), eps=1e-8)


def start_b(name: str, shape) -> torch.Tensor:
    """A non-zero B for both runs (B = 0, LoRA's own start, would make A's first gradient zero)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * 0.05


def is_a(name: str) -> bool:
    return name.endswith("lora_A") or name.endswith("lora_A.weight")


def base_weight_of(adapter_name: str) -> str:
    """`...attention.wq.lora_A.weight` -> `...attention.wq.weight`; `...experts.lora_w1.lora_A` -> `...experts.w1`."""
    if adapter_name.endswith(".weight"):
        return adapter_name.rsplit(".lora_", 1)[0] + ".weight"
    owner, w, _ = adapter_name.rsplit(".", 2)
    return f"{owner}.{w.removeprefix('lora_')}"


class HandWrittenLora:
    """The whole model, frozen, with W + s * B @ A substituted for each targeted weight."""

    def __init__(self, args, data, cfg: TrainConfig, lcfg: LoraConfig, seed: int) -> None:
        self.args, self.data, self.cfg, self.scale = args, data, cfg, lcfg.alpha / lcfg.rank
        self.model = ModelSource(args, None, seed).build_stage(full_spec(args), torch.float64, torch.device("cpu"))
        self.model.train()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the starting adapters: A as pp_runtime's (seeded by name), B from start_b; names map both ways
        twin = ModelSource(args, None, seed).build_stage(full_spec(args), torch.float64, torch.device("cpu"))
        names = apply_lora(twin, lcfg)
        start = dict(twin.named_parameters())
        self.adapters: dict[str, torch.nn.Parameter] = {}
        for n in names:
            t = start[n].detach().clone() if is_a(n) else start_b(n, start[n].shape)
            self.adapters[n] = torch.nn.Parameter(t)
        self.opt = torch.optim.AdamW(param_groups(list(self.adapters.items()), cfg.weight_decay), lr=cfg.lr,
                                     betas=cfg.betas, eps=cfg.eps)
        self.step_count = 0

    def weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        by_weight: dict[str, dict[str, torch.Tensor]] = {}
        for n, p in self.adapters.items():
            by_weight.setdefault(base_weight_of(n), {})["A" if is_a(n) else "B"] = p
        for w, ab in by_weight.items():
            delta = torch.bmm(ab["B"], ab["A"]) if ab["A"].dim() == 3 else ab["B"] @ ab["A"]
            params[w] = params[w] + self.scale * delta
        return params

    def step(self) -> tuple[float, float, dict[str, torch.Tensor]]:
        a = self.args
        batch = self.data.batch(self.step_count * self.cfg.batch_size, self.cfg.batch_size)
        meta = build_training_meta(batch.doc_lens, window=a.sliding_window, head_dim=a.head_dim,
                                   rope_theta=a.rope_theta, n_kv_groups=a.n_heads // a.n_kv_heads)
        self.opt.zero_grad(set_to_none=True)
        logits = torch.func.functional_call(self.model, self.weights(), (batch.tokens.reshape(-1), meta),
                                            {"logits": "all"})
        targets = batch.targets.reshape(-1)
        loss = token_loss(logits, targets) / int((targets != IGNORE).sum())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in self.adapters.items()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        if norm > self.cfg.grad_clip:
            for p in self.adapters.values():
                p.grad.mul_(self.cfg.grad_clip / (norm + 1e-6))
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_count, self.cfg)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach()), norm, grads


def run_case(name: str, v: int, preset_name: str, targets: tuple, ckpt: bool = False) -> None:
    from pp_runtime.distributed.parallel import init_parallel
    from pp_runtime.model.split_linear import WeightGradQueue

    args = {"tiny": TINY, "tiny-moe": TINY_MOE}[preset_name]
    ctx = init_parallel(2, 1, "cpu")
    data = dataset(args)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=targets, seed=5)
    schedule = split_bw_schedule(2, MICRO) if name == "1f1b-split" else build_schedule(name, 2, MICRO, v)
    plan = plan_for(args, 2, virtual_stages=v, training=True, stage_ranks=schedule.stage_ranks)
    source = ModelSource(args, None, seed=3)
    stages = {s.index: source.build_stage(s, torch.float64, ctx.device) for s in plan.for_rank(ctx.pp_rank)}
    base = {n: p.detach().clone() for m in stages.values() for n, p in m.named_parameters()}
    for m in stages.values():
        apply_lora(m, lcfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_" in n and not is_a(n):
                    p.copy_(start_b(n, p.shape))
    cfg = TrainConfig(**{**CFG.__dict__, "activation_checkpointing": ckpt})
    trainer = Trainer(ctx, args, schedule, stages, data, cfg, console=False)
    assert trainer.named_params and all(".lora_" in n for n, _ in trainer.named_params)
    ref = HandWrittenLora(args, data, cfg, lcfg, seed=3)
    deferred: set[str] = set()
    put = WeightGradQueue.put
    ids = {id(p): n for n, p in trainer.named_params}

    def recording_put(self, weight, x, grad_out):
        deferred.add(ids.get(id(weight), "a base weight"))
        put(self, weight, x, grad_out)

    WeightGradQueue.put = recording_put
    label = f"{name} v={v} {preset_name} {','.join(targets)} ckpt={ckpt} rank={ctx.rank}"
    try:
        for step in range(STEPS):
            stats = trainer.step()
            ref_loss, ref_norm, ref_grads = ref.step()
            assert math.isclose(stats.loss, ref_loss, rel_tol=1e-9), f"{label} step {step}: loss {stats.loss} vs {ref_loss}"
            assert math.isclose(stats.grad_norm, ref_norm, rel_tol=1e-9), \
                f"{label} step {step}: grad norm {stats.grad_norm} vs {ref_norm}"
            if step == 0:
                scale = min(1.0, cfg.grad_clip / (ref_norm + 1e-6))  # the trainer clips in place
                for n, p in trainer.named_params:
                    torch.testing.assert_close(p.grad, ref_grads[n] * scale, rtol=1e-8, atol=1e-12,
                                               msg=lambda m, n=n: f"{label}: gradient of {n}: {m}")
    finally:
        WeightGradQueue.put = put
    for n, p in trainer.named_params:
        torch.testing.assert_close(p.detach(), ref.adapters[n].detach(), rtol=1e-8, atol=1e-12,
                                   msg=lambda m, n=n: f"{label}: adapter {n} after {STEPS} steps: {m}")
    for m in stages.values():
        for n, p in m.named_parameters():
            if ".lora_" not in n:
                assert not p.requires_grad and p.grad is None, f"{label}: base weight {n} got a gradient"
                assert torch.equal(p.detach(), base[n]), f"{label}: base weight {n} changed"
    assert set(trainer.optimizer.state) == {p for _, p in trainer.named_params}  # no state for frozen weights
    split = any(a.kind == "W" for a in schedule.actions[ctx.pp_rank])
    dense = {n for n, _ in trainer.named_params if n.endswith(".weight")}  # LoraLinear adapters (not experts')
    if split:  # every dense adapter's weight gradient waited for its W; nothing else was deferred
        assert deferred == dense, f"{label}: deferred {sorted(deferred ^ dense)[:4]}"
    else:
        assert not deferred


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    rank_environment(rank, world, port)
    torch.set_num_threads(1)
    for case in cases:
        run_case(*case)
    shutdown()


@pytest.mark.timeout(240)
def test_lora_steps_match_hand_written_reference_on_two_stages():
    """2 stages x 1 replica, float64: every built-in schedule shape (plain, interleaved, V, B/W split),
    attention / feed-forward / expert adapters, activation checkpointing on B/W-split ones."""
    mp.start_processes(_worker, args=(2, free_port(), [
        ("1f1b", 1, "tiny", ATTN),
        ("gpipe", 1, "tiny-moe", ALL, True),
        ("zb-h1", 1, "tiny", ALL, True),
        ("1f1b-split", 1, "tiny-moe", ALL),
        ("interleaved", 2, "tiny-moe", ATTN),
        ("zb-v", 2, "tiny", ("wo", "w1", "w2", "w3")),
        ("interleaved-zb", 2, "tiny-moe", ("wq", "wv", "w2"), True),
    ]), nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize("backend", ["loop", "bmm"])
def test_expert_adapters_equal_merged_expert_weights(backend):
    """Each expert's adapter through the experts' own matmul backend (the CPU loop, and the batched
    matmul GPUs without grouped GEMM use) == that expert's weight with s * B @ A added: outputs and
    the gradients of x and of A, B (the merged weights' gradient pulled back by hand)."""
    from pp_runtime.model.args import MoeArgs
    from pp_runtime.model.moe import MoeFeedForward, experts_forward

    args = preset("tiny-moe", moe=MoeArgs(4, 2))
    torch.manual_seed(0)
    moe = MoeFeedForward(args).double()
    apply_lora(moe, LoraConfig(rank=3, alpha=6.0, targets=("w1", "w2", "w3")))
    e = moe.experts
    with torch.no_grad():
        for w in ("w1", "w2", "w3"):
            getattr(e, f"lora_{w}").lora_B.normal_(0, 0.1)
    x = torch.randn(11, args.dim, dtype=torch.float64, requires_grad=True)
    top, experts = torch.topk(moe.gate(x), 2, dim=-1)
    weights = torch.softmax(top, -1).detach()
    adapters = {w: getattr(e, f"lora_{w}") for w in ("w1", "w2", "w3")}
    out = experts_forward(x, experts, weights, e.w1, e.w2, e.w3, backend, adapters=adapters)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = [x.grad.clone()] + [p.grad.clone() for a in adapters.values() for p in (a.lora_A, a.lora_B)]

    x2 = x.detach().clone().requires_grad_(True)
    ab = {w: (a.lora_A.detach().clone().requires_grad_(True), a.lora_B.detach().clone().requires_grad_(True))
          for w, a in adapters.items()}
    merged = {w: getattr(e, w).detach() + 2.0 * torch.bmm(b, a) for w, (a, b) in ab.items()}
    ref = experts_forward(x2, experts, weights, merged["w1"], merged["w2"], merged["w3"], "loop")
    ref.backward(grad_out)
    want = [x2.grad] + [t.grad for pair in ab.values() for t in pair]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
