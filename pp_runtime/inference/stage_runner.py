"""One generation stage: its layers, its shard of the rolling KV cache and (last stage) the sampler.

Two ways to run a step. The reference path (CPU, or `inference.attention=sdpa`) runs the module as
written, with a padded dense mask. The fast path (`attention=triton`, the default on GPU) runs
fused kernels and varlen attention over the ring, pads the token count to a few buckets and, on
GPU, replays each bucket as a CUDA graph (pp_runtime.inference.fast_stage).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from pp_runtime.errors import ConfigError
from pp_runtime.inference.sampling import SamplingBatch, sample_tokens
from pp_runtime.inference.step_table import Step, StepChunk
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.attention_meta import SeqChunk, build_inference_meta
from pp_runtime.model.kv_cache import RollingKVCache
from pp_runtime.model.transformer import StageModule

if TYPE_CHECKING:
    from pp_runtime.inference.engine import InferenceConfig

RESULT_COLS = 3  # token id, logprob, finite (1.0 / 0.0), as float64


class _BusyClock:
    """Compute time of one stage: CUDA events on GPU (no sync in the loop), host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((token, ev))
        else:
            self.host += time.perf_counter() - token

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        return self.host


def fit_cache_len(free: int, total: int, args: ModelArgs, n_local_layers: int, n_slots: int,
                  cfg: "InferenceConfig", elt: int, where: str = "the GPU") -> int:
    """Ring length per sequence that fits `free` of `total` bytes after a reserve for one step's
    activations: what lets a model without a sliding window run with default settings."""
    a = args
    moe_rows = a.moe.num_experts_per_tok if a.moe else 1
    per_token = (6 * a.dim + (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + 3 * moe_rows * a.hidden_dim) * 4
    reserve = cfg.max_batch_tokens * per_token + cfg.batch_size * a.vocab_size * 16 + (1 << 30)
    budget = total * cfg.gpu_memory_fraction - (total - free) - reserve
    per_position = 2 * n_local_layers * n_slots * a.n_kv_heads * a.head_dim * elt
    fit = int(budget // max(per_position, 1)) // 256 * 256
    if fit < min(256, cfg.cache_len):
        raise ConfigError(
            f"the KV cache does not fit on {where}: {n_slots} slots need {per_position / 2**20:.1f} MiB per "
            f"position and {max(budget, 0) / 2**30:.1f} GiB are left under inference.gpu_memory_fraction="
            f"{cfg.gpu_memory_fraction}; lower inference.batch_size or inference.microbatches, use more "
            "pipeline stages, or raise inference.gpu_memory_fraction"
        )
    return min(cfg.cache_len, fit)


class StageRunner:
    """Runs steps of one stage. `run` returns activations `[bucket, dim]`, or on the last stage
    a results tensor `[rows, 3]` that is safe to send while later steps run."""

    def __init__(self, args: ModelArgs, module: StageModule, cfg: "InferenceConfig", device: torch.device,
                 dtype: torch.dtype) -> None:
        self.args, self.module, self.cfg, self.device, self.dtype = args, module.eval(), cfg, device, dtype
        module.requires_grad_(False)  # generation never backpropagates: fused kernels, nothing saved
        self.is_last = module.spec.has_head
        fast = cfg.attention == "triton" or (cfg.attention == "auto" and device.type == "cuda")
        n_slots = cfg.microbatches * cfg.batch_size
        n_layers = len(module.spec.layers)
        capacity = cfg.cache_len
        if cfg.cache_from_memory and device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            capacity = fit_cache_len(free, total, args, n_layers, n_slots + int(fast), cfg,
                                     torch.finfo(dtype).bits // 8, str(device))
        self.capacity = capacity
        # the fast path pads steps with rows that point at one scratch slot no sequence owns
        self.cache = RollingKVCache(list(module.spec.layers), n_slots + int(fast), capacity, args.n_kv_heads,
                                    args.head_dim, dtype, device)
        self.clock = _BusyClock(device)
        self._result_stream: Optional[torch.cuda.Stream] = None
        self.fast = None
        if fast:
            from pp_runtime.inference.fast_stage import FastStage

            with torch.inference_mode():  # graph capture happens here
                self.fast = FastStage(args, self.module, self.cache, cfg, device, scratch_slot=n_slots,
                                      graphs=cfg.cuda_graphs and device.type == "cuda")

    def describe_cache(self) -> str:
        gib = self.cache.nbytes / 2**30
        return f"{self.cache.n_slots} slots x {self.capacity} positions ({gib:.2f} GiB)"

    # ------------------------------------------------------------------ shapes the engine needs
    def bucket_for(self, n_tokens: int) -> int:
        return self.fast.bucket_for(n_tokens) if self.fast is not None else n_tokens

    def input_buffer(self, step: Step) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.input_buffer(step.bucket)
        return torch.empty((step.bucket, self.args.dim), dtype=self.dtype, device=self.device)

    def results_buffer(self, step: Step) -> torch.Tensor:
        rows = self.cfg.batch_size if self.fast is not None else len(step.chunks)
        return torch.empty((rows, RESULT_COLS), dtype=torch.float64, device=self.device)

    def results_to_host(self, results: torch.Tensor, received: Optional[dist.Work] = None):
        """Start copying a step's results to the host; returns them and what says they are there.

        On GPU the copy runs on a stream of its own behind the receive (if any), so reading one
        step's tokens never waits for the later steps already queued on the compute stream."""
        if results.device.type != "cuda":
            return results, received
        if self._result_stream is None:
            self._result_stream = torch.cuda.Stream(self.device)
        stream = self._result_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the step (or the posted receive)
        with torch.cuda.stream(stream):
            if received is not None:
                received.wait()
            host = torch.empty(results.shape, dtype=results.dtype, pin_memory=True)
            host.copy_(results, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        return host, ev

    # ------------------------------------------------------------------ compute
    def run(self, step: Step, tokens: Optional[Sequence[int]] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """First stage passes the step's token ids, later stages the received activations."""
        tok = self.clock.start()
        with torch.inference_mode():
            if self.fast is not None:
                out = self.fast.run(step, tokens=tokens, x=x)
            else:
                out = self._run_reference(step, tokens, x)
        self.clock.stop(tok)
        return out

    def _run_reference(self, step: Step, tokens, x) -> torch.Tensor:
        if tokens is not None:
            x = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        seqs = [SeqChunk(c.slot, c.start, c.n_tokens) for c in step.chunks]
        a = self.args
        meta = build_inference_meta(seqs, capacity=self.capacity, window=a.sliding_window, head_dim=a.head_dim,
                                    rope_theta=a.rope_theta, n_kv_groups=a.n_heads // a.n_kv_heads,
                                    device=self.device)
        out = self.module(x[: step.n_tokens], meta, self.cache, logits="last")
        return self.sample(out, step.chunks) if self.is_last else out

    def sample(self, logits: torch.Tensor, chunks: Sequence[StepChunk]) -> torch.Tensor:
        """[rows, 3] float64: sampled id, its logprob under the model, whether the row's logits were finite."""
        batch = SamplingBatch.build([c.sampling for c in chunks], [c.uid for c in chunks],
                                    [c.start + c.n_tokens for c in chunks], logits.device)  # position to take
        ids, lps, finite = sample_tokens(logits, batch, greedy_only=all(c.sampling.temperature == 0 for c in chunks))
        return torch.stack([ids.double(), lps.double(), finite.double()], dim=1)

    # ------------------------------------------------------------------ accounting
    def reset_clock(self) -> None:
        self.clock = _BusyClock(self.device)

    def busy_seconds(self) -> float:
        return self.clock.total()

    def graph_summary(self) -> str:
        return self.fast.graph_summary() if self.fast is not None else ""
