"""The `launch/infer.py` job: pipelined generation over prompts from the command line or JSONL."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch.distributed as dist

from pp_runtime.checkpoints.model_source import DEMO_DIR, ModelSource, resolve_dtype
from pp_runtime.distributed.parallel import ParallelContext, agree, init_parallel
from pp_runtime.distributed.threads import startup_line
from pp_runtime.errors import CheckpointError, ConfigError, InputError
from pp_runtime.inference.batching import Completion, Request
from pp_runtime.inference.engine import RunStats, StageRunner, run_pipeline
from pp_runtime.inference.progress import InferProgress
from pp_runtime.inference.requests import PromptRecord, TokenLimit, check_request, make_request, parse_prompt_line
from pp_runtime.io.jsonl import check_input_file, iter_lines
from pp_runtime.io.output_files import check_output_file
from pp_runtime.io.tokenizer import Tokenizer
from pp_runtime.jobs.config import make_plan, model_source, resolve_path
from pp_runtime.jobs.settings import GenerationSettings, InferSettings, to_settings

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass
class InferenceSetup:
    ctx: ParallelContext
    source: ModelSource
    runner: StageRunner
    tokenizer: Optional[Tokenizer]  # first stages only: they tokenize prompts and decode completions


def setup_inference(cfg: GenerationSettings, ctx: Optional[ParallelContext] = None) -> InferenceSetup:
    """Process groups, plan, tokenizer, this stage's weights and cache: shared by infer and batch_infer.

    Whatever fails on one rank (its shard of the checkpoint, the tokenizer or input file that only
    first stages read) fails on every rank with the same message, before any stage waits on another."""
    ctx = ctx or init_parallel(cfg.pipeline.stages, cfg.pipeline.data_parallel, cfg.device)

    def build() -> InferenceSetup:
        source = model_source(cfg.model)
        plan = make_plan(source.args, ctx, cfg.pipeline)
        if ctx.rank == 0:
            print(f"stage plan ({ctx.pp_size} stage(s) x {ctx.dp_size} replica(s)):\n{plan.describe()}\n"
                  f"{startup_line()}", flush=True)
        tokenizer = None
        if ctx.is_first:
            tokenizer = load_tokenizer(source, cfg.model.tokenizer, cfg.model.chat)
            if cfg.input is not None:
                check_input_file(resolve_path(cfg.input))
        dtype = resolve_dtype(cfg.model.dtype, ctx.device)
        module = source.build_stage(plan.stages[ctx.pp_rank], dtype, ctx.device)
        adapter = resolve_path(cfg.model.adapter)
        if adapter is not None:  # a LoRA adapter (PEFT format), merged into this stage's weights
            from pp_runtime.training.peft_export import apply_peft_adapter_

            apply_peft_adapter_(module, adapter, source.args)
            if ctx.rank == 0:
                print(f"LoRA adapter {adapter} merged into the weights", flush=True)
        icfg = cfg.inference.resolved(source.args, ctx.pp_size)
        return InferenceSetup(ctx, source, StageRunner(source.args, module, icfg, ctx.device, dtype), tokenizer)

    setup = agree(ctx, build)
    _report_caches(ctx, setup.runner)
    return setup


def _report_caches(ctx: ParallelContext, runner: StageRunner) -> None:
    """Rank 0 prints each stage's KV cache (slots x positions), as sized on its own device; every
    stage then admits requests by the shortest ring of its pipeline."""
    mine = (f"stage {ctx.pp_rank}: {runner.describe_cache()}", runner.capacity)
    notes = [mine]
    if ctx.distributed:
        notes = [None] * ctx.world_size
        dist.all_gather_object(notes, mine)
    replica = notes[ctx.dp_rank * ctx.pp_size : (ctx.dp_rank + 1) * ctx.pp_size]
    runner.capacity = min(cap for _, cap in replica)
    if ctx.rank == 0:
        print("kv cache: " + "; ".join(line for line, _ in replica), flush=True)


def load_tokenizer(source: ModelSource, tokenizer: Optional[str] = None, chat: Optional[str] = None) -> Tokenizer:
    """`model.tokenizer` when given, else the tokenizer.model in the checkpoint folder; `chat` is the
    template version of `messages` inputs (model.chat: auto, v1 or v3)."""
    where = resolve_path(tokenizer) or source.path
    if where is None:
        raise ConfigError("a random `preset` model has no tokenizer; set model.tokenizer=PATH (a tokenizer.model "
                          "with the preset's vocab_size) or give model.path=DIR with a tokenizer.model")
    tok = Tokenizer.from_dir(where, chat)
    if tok.vocab_size != source.args.vocab_size:
        raise CheckpointError(
            f"{tok.path} has {tok.vocab_size} pieces but the model's vocab_size is {source.args.vocab_size}; "
            "use the tokenizer that belongs to these weights (model.tokenizer=PATH)"
        )
    return tok


def prompt_records(cfg: InferSettings, source: ModelSource) -> Iterator[PromptRecord]:
    """The command-line prompt, or the input file's lines; the embedded demo answers its own examples."""
    if cfg.prompt is not None and cfg.input is not None:
        raise ConfigError('give one of prompt="..." or input=FILE.jsonl, not both')
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise InputError("the prompt is empty; give a non-empty prompt=")
        yield PromptRecord(line_no=0, id=0, prompt=cfg.prompt)
        return
    if cfg.input is not None:
        path, name = resolve_path(cfg.input), str(cfg.input)
    elif source.path == DEMO_DIR:
        from pp_runtime.demo import PROMPTS

        path, name = PROMPTS, "demo prompts"
    else:
        raise ConfigError('give prompt="..." or input=FILE.jsonl')
    for no, line in iter_lines(path):
        yield parse_prompt_line(line, no, source=name)


def replica_requests(cfg: InferSettings, ctx: ParallelContext, source: ModelSource, tokenizer,
                     limit: TokenLimit) -> list[Request]:
    """This replica's share of the requests (every dp_size-th, by input order), all checked before any
    generation: a bad line found at the end must not cost the results of the lines before it."""
    out = []
    for uid, rec in enumerate(prompt_records(cfg, source)):
        if uid % ctx.dp_size == ctx.dp_rank:
            req = make_request(uid, rec, tokenizer, cfg.max_new_tokens, cfg.sampling)
            check_request(req, limit, rec.where or f"request {rec.id!r}")
            out.append(req)
    return out


def completion_record(c: Completion, tokenizer) -> dict:
    return {
        "id": c.request.id,
        "prompt": c.request.prompt,
        "completion": tokenizer.decode(c.tokens) if tokenizer is not None else None,
        "tokens": c.tokens,
        "logprobs": [round(x, 5) if math.isfinite(x) else None for x in c.logprobs],  # JSON has no NaN
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(c.request.prompt_tokens),
        "generated_tokens": len(c.tokens),
    }


def run(cfg: "InferSettings | DictConfig") -> int:
    cfg = to_settings(cfg, "infer")
    setup = setup_inference(cfg)
    ctx, source, runner, tokenizer = setup.ctx, setup.source, setup.runner, setup.tokenizer

    def prepare() -> Optional[list[Request]]:
        out = resolve_path(cfg.output)
        if ctx.rank == 0 and out is not None:  # before generating: an unwritable output must not cost the work
            check_output_file(out, "output", resolve_path(cfg.input))
        limit = TokenLimit.of(source.args, runner.capacity)
        return replica_requests(cfg, ctx, source, tokenizer, limit) if ctx.is_first else None

    requests = agree(ctx, prepare)
    progress = _progress(cfg, ctx)
    records: list[tuple[int, dict]] = []

    def on_complete(c: Completion) -> None:
        records.append((c.request.uid, completion_record(c, tokenizer)))
        progress.finished()

    _, stats = run_pipeline(ctx, runner, iter(requests) if requests is not None else None,
                            tokenizer.eos_id if tokenizer else None, on_complete)
    if ctx.rank != 0:
        progress.close()
    all_records, all_stats = _gather_to_rank0(ctx, records, stats)
    if ctx.rank == 0:
        progress.close()  # after the gather: every replica has published its count
        all_records.sort(key=lambda r: r[0])
        _write(cfg, [r for _, r in all_records])
        _demo_hint(source, [r for _, r in all_records])
        print(all_stats.summary(), flush=True)
    return 0


def _progress(cfg: InferSettings, ctx: ParallelContext) -> InferProgress:
    """For input files: rank 0 reports finished prompts over all replicas (every progress_interval
    seconds in logs)."""
    enabled = cfg.progress and cfg.input is not None
    total = sum(1 for _ in iter_lines(resolve_path(cfg.input))) if enabled and ctx.rank == 0 else None
    return InferProgress(ctx, total, enabled, cfg.progress_interval)


def _demo_hint(source: ModelSource, records: list[dict]) -> None:
    """The demo model only knows its task's characters: say so when a prompt strays from them."""
    if source.path != DEMO_DIR:
        return
    from pp_runtime.demo import task

    if any(set(r["prompt"]) - set(task.CHARS) for r in records):
        print(f"note: the demo model knows only the characters {task.CHARS!r} ({task.DESCRIPTION}); "
              "other text gets empty or meaningless answers", flush=True)


def _gather_to_rank0(ctx: ParallelContext, records: list, stats: RunStats) -> tuple[list, RunStats]:
    if not ctx.distributed:
        return records, stats
    gathered: Optional[list] = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object((records, stats if ctx.is_first else None), gathered, dst=0)
    if ctx.rank != 0:
        return [], stats
    merged = [r for recs, _ in gathered for r in recs]
    replica_stats = [s for _, s in gathered if s is not None]
    total = replica_stats[0]
    for s in replica_stats[1:]:
        total.prompts += s.prompts
        total.prompt_tokens += s.prompt_tokens
        total.generated_tokens += s.generated_tokens
        total.decode_tokens += s.decode_tokens
        total.wall_s = max(total.wall_s, s.wall_s)
        total.prefill_s = max(total.prefill_s, s.prefill_s)
        total.decode_s = max(total.decode_s, s.decode_s)
    return merged, total


def _write(cfg: InferSettings, records: list[dict]) -> None:
    out = resolve_path(cfg.output)
    if out is None:
        for r in records:
            print(f"[{r['id']}] {r['prompt']!r} -> {r['completion']!r} ({r['finish_reason']})")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(out)
    print(f"wrote {len(records)} results to {out}", flush=True)
