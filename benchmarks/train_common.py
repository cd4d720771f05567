"""What every configuration of `bench_train.py` shares: the model shape, seeded stages, the
synthetic batch, collective helpers, a memory estimate, and the guard that stops a hung run."""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pp_runtime.distributed.parallel import ParallelContext  # noqa: E402
from pp_runtime.model.args import ModelArgs  # noqa: E402
from pp_runtime.model.partition import StageSpec  # noqa: E402
from pp_runtime.model.transformer import StageModule  # noqa: E402
from pp_runtime.training.data import Document, PackedDataset  # noqa: E402
from pp_runtime.training.memory_plan import stage_params  # noqa: E402

GB = 1e9


def sync(ctx: ParallelContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def gather(ctx: ParallelContext, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def free_memory(ctx: ParallelContext) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def allocated_gb(ctx: ParallelContext) -> Optional[float]:
    if ctx.device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(ctx.device) / GB, 2)


def peak_memory_gb(ctx: ParallelContext) -> Optional[float]:
    if ctx.device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(ctx.device) / GB, 2)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe_error(e: BaseException) -> str:
    kind = "OOM" if is_oom(e) else type(e).__name__
    return f"{kind}: {' '.join(str(e).split())[:300]}"


def model_args(a: argparse.Namespace) -> ModelArgs:
    return ModelArgs(dim=a.dim, n_layers=a.layers, head_dim=a.head_dim, hidden_dim=a.hidden, n_heads=a.heads,
                     n_kv_heads=a.kv_heads, vocab_size=a.vocab, sliding_window=a.window,
                     max_seq_len=max(32768, a.seq))


def build_stage(margs: ModelArgs, spec: StageSpec, dtype: torch.dtype, device: torch.device, seed: int) -> StageModule:
    """The stage's blocks, allocated directly on the device and filled with N(0, 0.02) (norms 1),
    seeded per parameter by its global name: every configuration, whatever its split, trains the
    same weights.
    """
    with torch.device("meta"):
        module = StageModule(margs, spec).to(dtype)
    module = module.to_empty(device=device)
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=gen)
    return module


def synthetic_data(a: argparse.Namespace) -> PackedDataset:
    """`--microbatches` rows of `--seq` random tokens, one document per row (every step sees the same rows)."""
    rng = random.Random(a.seed)
    docs = [Document([rng.randrange(a.vocab) for _ in range(a.seq)], [True] * a.seq) for _ in range(a.microbatches)]
    return PackedDataset.from_documents(docs, a.seq, shuffle=False)


def estimate_memory_gb(a: argparse.Namespace, margs: ModelArgs, specs: Sequence[StageSpec], held: int,
                       elem: int) -> float:
    """Rough peak for one rank: weights, gradients, optimizer state of its stages, plus `held`
    micro-batches' activations of one of its stages (the simulator's peak for the schedule, in
    stages) and the logits where it holds the head."""
    n = sum(stage_params(margs, spec) for spec in specs)
    static = n * (elem + elem + (4 + 4 + 8 if a.master_weights else 2 * elem))
    transient = n * (4 if a.master_weights else elem)  # AdamW's temporaries at the step
    layers = max(spec.last - spec.first for spec in specs)
    per_token_layer = elem * (margs.dim if a.activation_checkpointing else 4 * margs.hidden_dim + 11 * margs.dim)
    acts = held * layers * per_token_layer * a.seq
    if any(spec.has_head for spec in specs):
        acts += min(held, a.microbatches) * a.seq * margs.vocab_size * 4 * 3  # float32 logits, log-softmax, gradient
    return (static + max(acts, transient)) / GB


# ---------------------------------------------------------------------------------- failure guard
class Guard:
    """Stops the whole run, with the results so far, when a configuration fails or hangs mid-training.

    A failed step leaves the peer blocked in a receive or a collective that never completes, so the
    failing rank posts the reason in the rendezvous store; a watcher thread on every rank sees it
    (or sees the configuration run past `--config-timeout`), rank 0 prints the failure and the
    summary, and every rank exits.
    """

    FAILED, PRINTED = "bench_train/failed", "bench_train/printed"

    def __init__(self, ctx: ParallelContext, limit_s: float, report: Callable[[str, Optional[str]], None]) -> None:
        self.ctx, self.limit_s, self.report = ctx, limit_s, report
        self.store = None
        if ctx.distributed:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - without a store, timeouts still stop the run
                self.store = None
        self.label: Optional[str] = None
        self.t0 = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def enter(self, label: str) -> None:
        self.label, self.t0 = label, time.monotonic()

    def leave(self) -> None:
        self.label = None

    def fail(self, msg: str) -> None:
        self._post(msg)
        self._abort(msg)

    def _post(self, msg: str) -> None:
        if self.store is not None:
            try:
                self.store.set(self.FAILED, msg)
            except Exception:  # noqa: BLE001
                pass

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            if self.store is not None:
                try:
                    if self.store.check([self.FAILED]):
                        self._abort(self.store.get(self.FAILED).decode())
                except Exception:  # noqa: BLE001 - the store goes away when a peer exits
                    pass
            label = self.label
            if label is not None and time.monotonic() - self.t0 > self.limit_s:
                msg = (f"{label}: still running after {self.limit_s:g} s on rank {self.ctx.rank} "
                       "(hung, or a peer failed); stopping")
                self._post(msg)
                self._abort(msg)

    def _abort(self, msg: str) -> None:
        if not self._lock.acquire(blocking=False):
            while True:
                time.sleep(60)  # another thread is already stopping the process
        if self.ctx.rank == 0:
            try:
                self.report(msg, self.label)
            finally:
                sys.stdout.flush()
                if self.store is not None:
                    try:
                        self.store.set(self.PRINTED, "1")
                    except Exception:  # noqa: BLE001
                        pass
        else:
            deadline = time.monotonic() + 20.0
            while self.store is not None and time.monotonic() < deadline:
                try:
                    if self.store.check([self.PRINTED]):
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)




def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a parameter `name` (APIs differ between library versions)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
