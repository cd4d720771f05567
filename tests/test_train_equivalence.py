"""Pipelined training == one process on the whole batch: same loss, same gradients, same loss curve.

One group of gloo processes per world size (no torchrun); every rank runs several
schedule x stages x replicas cases in turn and compares its own stages' gradients with a plain
reference (the whole model as one StageModule, all rows at once, loss over all valid targets,
AdamW + clipping written out here), in float64.

Coverage: gpipe, 1f1b, interleaved(v=2) each on 4 stages x 1 replica and on 2 stages x 2 replicas
(world 4), zb-h1 on 4 stages (MoE) and on 2 (with activation checkpointing), zb-v (the V
placement: rank 0 holds the first and the last stage) on 4 stages and on 2 stages x 2 replicas,
interleaved-zb on 4 stages, and 2 stages x 1 replica (world 2: interleaved, zb-v, interleaved-zb
under activation checkpointing, plus a schedule that splits every B and W).
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.multiprocessing as mp

from dist_utils import free_port, rank_environment
from pp_runtime.checkpoints.formats import full_spec
from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.distributed.parallel import shutdown
from pp_runtime.model.args import ModelArgs, MoeArgs
from pp_runtime.model.attention_meta import build_training_meta
from pp_runtime.model.partition import plan_for
from pp_runtime.training.data import IGNORE, Document, PackedDataset
from pp_runtime.training.schedules import Action, Schedule, build_schedule, schedule_1f1b
from pp_runtime.training.simulator import validate
from pp_runtime.training.trainer import TrainConfig, Trainer, lr_at, param_groups, token_loss

DENSE = ModelArgs(dim=32, n_layers=8, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
                  sliding_window=6, max_seq_len=64)
MOE = ModelArgs(dim=32, n_layers=4, head_dim=8, hidden_dim=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                sliding_window=6, max_seq_len=64, moe=MoeArgs(4, 2))
SEQ_LEN = 16
BATCH = 8
MICRO = 4
STEPS = 3
CFG = TrainConfig(steps=10, batch_size=BATCH, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1,
                  grad_clip=0.5, betas=(0.9, 0.95), eps=1e-8)


def dataset(args: ModelArgs) -> PackedDataset:
    """Documents of varied length (some longer than a row, many shorter than the window) with
    prompt-style loss masks, packed with padding: exercises every masking path."""
    rng = random.Random(0)
    docs = []
    for i in range(40):
        n = rng.randint(2, 22)
        toks = [1] + [rng.randrange(3, args.vocab_size) for _ in range(n - 1)]
        prompt = rng.randint(1, n - 1) if i % 3 == 0 else 1
        docs.append(Document(toks, [False] * prompt + [True] * (n - prompt)))
    return PackedDataset.from_documents(docs, SEQ_LEN, pad_id=2, shuffle=True, seed=1)


def split_bw_schedule(n_ranks: int, n_micro: int) -> Schedule:
    """1F1B with every backward split into B (input grad) then W (weight grad) right after."""
    base = schedule_1f1b(n_ranks, n_micro)
    rows = [[x for a in row for x in ((a, Action("W", a.microbatch, a.stage)) if a.kind == "B" else (a,))]
            for row in base.actions]
    sched = Schedule(n_ranks, n_micro, 1, rows, name="1f1b-split")
    validate(sched)
    return sched


class Reference:
    """The whole model in one StageModule, every row of the step at once."""

    def __init__(self, args: ModelArgs, data: PackedDataset, cfg: TrainConfig, seed: int) -> None:
        self.args, self.data, self.cfg = args, data, cfg
        self.model = ModelSource(args, None, seed).build_stage(full_spec(args), torch.float64, torch.device("cpu"))
        self.model.train()
        self.opt = torch.optim.AdamW(param_groups(list(self.model.named_parameters()), cfg.weight_decay),
                                     lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.step_count = 0

    def step(self) -> tuple[float, float, dict[str, torch.Tensor]]:
        a = self.args
        batch = self.data.batch(self.step_count * self.cfg.batch_size, self.cfg.batch_size)
        meta = build_training_meta(batch.doc_lens, window=a.sliding_window, head_dim=a.head_dim,
                                   rope_theta=a.rope_theta, n_kv_groups=a.n_heads // a.n_kv_heads)
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(batch.tokens.reshape(-1), meta, logits="all")
        targets = batch.targets.reshape(-1)
        n_valid = int((targets != IGNORE).sum())
        loss = token_loss(logits, targets) / n_valid
        loss.backward()
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in self.model.named_parameters()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        if norm > self.cfg.grad_clip:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.cfg.grad_clip / (norm + 1e-6))
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_count, self.cfg)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach()), norm, grads


def run_case(name: str, pp: int, dp: int, v: int, args: ModelArgs, ckpt: bool = False) -> None:
    from pp_runtime.distributed.parallel import init_parallel

    ctx = init_parallel(pp, dp, "cpu")
    data = dataset(args)
    schedule = split_bw_schedule(pp, MICRO) if name == "1f1b-split" else build_schedule(name, pp, MICRO, v)
    plan = plan_for(args, pp, virtual_stages=v, training=True, stage_ranks=schedule.stage_ranks)
    source = ModelSource(args, None, seed=3)
    stages = {s.index: source.build_stage(s, torch.float64, ctx.device) for s in plan.for_rank(ctx.pp_rank)}
    cfg = TrainConfig(**{**CFG.__dict__, "activation_checkpointing": ckpt})
    trainer = Trainer(ctx, args, schedule, stages, data, cfg, console=False)
    ref = Reference(args, data, cfg, seed=3)
    label = f"{name} pp={pp} dp={dp} v={v} rank={ctx.rank}"
    for step in range(STEPS):
        stats = trainer.step()
        ref_loss, ref_norm, ref_grads = ref.step()
        assert math.isclose(stats.loss, ref_loss, rel_tol=1e-6), f"{label} step {step}: loss {stats.loss} vs {ref_loss}"
        assert math.isclose(stats.grad_norm, ref_norm, rel_tol=1e-6), f"{label} step {step}: grad norm {stats.grad_norm} vs {ref_norm}"
        assert list(stats.phases) == ["data", "schedule", "grad_reduce", "clip", "loss", "optimizer"], stats.phases
        assert sum(stats.phases.values()) <= stats.step_time_s  # measured inside the step
        if step == 0:
            assert len(stats.timings) == len(schedule.actions[ctx.pp_rank])
            scale = min(1.0, cfg.grad_clip / (ref_norm + 1e-6))  # trainer grads are clipped in place
            for n, p in trainer.named_params:
                torch.testing.assert_close(p.grad, ref_grads[n] * scale, rtol=1e-6, atol=1e-9,
                                           msg=lambda m, n=n: f"{label}: gradient of {n}: {m}")
    # the updated weights agree too
    ref_params = dict(ref.model.named_parameters())
    for n, p in trainer.named_params:
        torch.testing.assert_close(p.detach(), ref_params[n].detach(), rtol=1e-6, atol=1e-9,
                                   msg=lambda m, n=n: f"{label}: weight {n} after {STEPS} steps: {m}")


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    rank_environment(rank, world, port)
    torch.set_num_threads(1)
    for case in cases:
        run_case(*case)
    shutdown()


def _spawn(world: int, cases: list) -> None:
    # fork: the children inherit the imported modules (a spawn costs seconds of imports per rank)
    mp.start_processes(_worker, args=(world, free_port(), cases), nprocs=world, join=True, start_method="fork")


@pytest.mark.timeout(240)
def test_four_ranks_match_single_process():
    """4 stages x 1 replica and 2 stages x 2 replicas, every built-in schedule on one or both."""
    _spawn(4, [
        ("gpipe", 4, 1, 1, DENSE, True),
        ("1f1b", 4, 1, 1, DENSE),
        ("interleaved", 4, 1, 2, DENSE),
        ("gpipe", 2, 2, 1, DENSE),
        ("1f1b", 2, 2, 1, MOE),
        ("interleaved", 2, 2, 2, DENSE),
        ("zb-h1", 4, 1, 1, MOE),
        ("zb-v", 4, 1, 2, DENSE),
        ("zb-v", 2, 2, 2, DENSE),
        ("interleaved-zb", 4, 1, 2, DENSE),
    ])


@pytest.mark.timeout(240)
def test_two_ranks_match_single_process():
    """2 stages x 1 replica: interleaved (rank 1 sends rank 0 both activations and gradients), a
    schedule that splits every backward into B and W, ZB-H1 under activation checkpointing, ZB-V
    (MoE) and interleaved 1F1B with the B/W split under activation checkpointing."""
    _spawn(2, [
        ("interleaved", 2, 1, 2, MOE),
        ("1f1b-split", 2, 1, 1, DENSE),
        ("zb-h1", 2, 1, 1, DENSE, True),
        ("zb-v", 2, 1, 2, MOE),
        ("interleaved-zb", 2, 1, 2, DENSE, True),
    ])


# --- the data the steps run on ----------------------------------------------------------------


class _CharTokenizer:
    """Stand-in tokenizer: one id per character (BOS 1, EOS 2)."""

    bos_id, eos_id, vocab_size = 1, 2, 128
    path = "chars"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([1] if bos else []) + [3 + (ord(c) % 120) for c in text] + ([2] if eos else [])


def test_loss_mask_and_packing(tmp_path):
    import json

    from pp_runtime.training.data import read_documents

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "ab", "completion": "cd"},  # BOS a b | c d EOS: targets c, d, EOS only
        {"text": "xyz"},  # BOS x y z EOS: every next token
        {"text": "0123456789"},  # 12 tokens: longer than a row of 8, cut into 8 + 4
    ]) + "\n\n")
    docs = read_documents(path, _CharTokenizer())
    tok = _CharTokenizer().encode
    assert docs[0].targets() == [IGNORE, IGNORE, tok("c", False)[0], tok("d", False)[0], 2, IGNORE]
    assert docs[1].targets() == tok("xyz", False) + [2, IGNORE]
    data = PackedDataset.from_documents(docs, 8, pad_id=0, shuffle=False)
    assert data.doc_lens == [[6, 2], [5, 3], [8], [4, 4]]  # a doc that does not fit closes the row with padding
    assert data.tokens[0, 6:].tolist() == [0, 0] and data.targets[0, 6:].tolist() == [IGNORE, IGNORE]
    assert data.targets[0, :6].tolist() == docs[0].targets()
    assert data.targets[2, 7].item() == tok("7", False)[0]  # a cut document still predicts across the cut


def test_row_stream_is_deterministic_and_resumable():
    a, b = dataset(DENSE), dataset(DENSE)
    whole = a.batch(5, 30)  # crosses epoch boundaries (17 rows an epoch)
    first, rest = b.batch(5, 12), b.batch(17, 18)
    assert torch.equal(whole.tokens, torch.cat([first.tokens, rest.tokens]))
    assert whole.doc_lens == first.doc_lens + rest.doc_lens
    epoch0 = sorted(a.row_at(i) for i in range(len(a)))
    assert epoch0 == list(range(len(a)))  # each epoch visits every row once
    assert [a.row_at(i) for i in range(len(a))] != [a.row_at(len(a) + i) for i in range(len(a))]  # reshuffled


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"prompt": "x"}', 'line 2: expected {"text": ...} or {"prompt": ..., "completion": ...}, got keys: prompt'),
    ('{"text": 3}', 'line 2: "text" must be a string'),
    ('{"text": "a"', "line 2: not valid JSON"),
])
def test_bad_lines_name_their_line(tmp_path, line, message):
    from pp_runtime.errors import InputError
    from pp_runtime.training.data import read_documents

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=re.escape(message)):
        read_documents(path, _CharTokenizer())
