"""The `launch/finetune.py` job: pipelined training from a Hydra config (see conf/finetune.yaml).

Everything that can fail on user input (model config, schedule, batch shape, tokenizer, data
file, resume checkpoint) is checked on every rank before training starts; the ranks then compare
notes, so a problem found on any rank stops all of them with the same one-line message and a
non-zero exit instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from pp_runtime.args import ModelArgs, preset
from pp_runtime.config import resolve_path
from pp_runtime.errors import ConfigError
from pp_runtime.model import StageModule
from pp_runtime.parallel import ParallelContext, agree, init_parallel
from pp_runtime.partition import StagePlan, plan_for
from pp_runtime.runtime import ModelSource, resolve_dtype
from pp_runtime.schedules import Schedule, build_schedule, check_microbatches, load_schedule
from pp_runtime.simulator import simulate
from pp_runtime.train_data import PackedDataset, check_batch_shape, validate_token_ids
from pp_runtime.trainer import StepStats, TrainConfig, Trainer
from pp_runtime import train_checkpoint as tc


# ---------------------------------------------------------------------------------- pieces
def model_source(model_cfg: DictConfig) -> ModelSource:
    """Pretrained checkpoint (`model.path`), or a from-scratch architecture (`model.params` /
    `model.preset`, with `model.args` overriding single fields)."""
    overrides = model_cfg.get("args")
    overrides = OmegaConf.to_container(overrides, resolve=True) if isinstance(overrides, DictConfig) else overrides
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"model.args must be a mapping of params.json fields, e.g. model.args='{{dim: 64}}', got {overrides!r}")
    if model_cfg.get("path"):
        if overrides:
            raise ConfigError("model.args only applies to training from scratch; a checkpoint (model.path) fixes the architecture")
        return ModelSource.from_config(model_cfg)
    seed = int(model_cfg.get("seed", 0) or 0)
    params = resolve_path(model_cfg.get("params"))
    if params is not None:
        if not params.is_file():
            raise ConfigError(f"model.params={str(params)!r} does not exist; give a params.json file")
        try:
            base = json.loads(params.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.params {params} is not valid JSON ({e})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"model.params {params} must hold a JSON object of model fields")
    elif model_cfg.get("preset"):
        base = preset(model_cfg.preset).to_params_json()
    else:
        raise ConfigError("no model: set model.path=DIR (fine-tune), model.params=FILE or model.preset=NAME (from scratch)")
    fields = {**base, **(overrides or {})}
    known = set(ModelArgs.__dataclass_fields__) | {"moe"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"model.args has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        args = ModelArgs.from_params_json(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad model fields {fields}: {e}") from None
    return ModelSource(args, None, seed)


def make_schedule(cfg: DictConfig, pp_size: int) -> Schedule:
    sc = cfg.schedule
    if sc.get("file"):
        schedule = load_schedule(resolve_path(sc.file))
        if schedule.n_ranks != pp_size:
            raise ConfigError(f"schedule file {sc.file} is for {schedule.n_ranks} ranks but the pipeline has {pp_size} stages")
    else:
        check_microbatches(sc.name, pp_size, int(sc.microbatches))
        schedule = build_schedule(sc.name, pp_size, int(sc.microbatches), int(sc.virtual_stages))
    simulate(schedule)  # rejects incomplete, mis-ordered or deadlocking schedules with the step it hangs at
    return schedule


def train_config(cfg: DictConfig) -> TrainConfig:
    t = cfg.train
    mw = t.get("master_weights", "auto")
    master = None if mw in (None, "auto") else bool(mw)
    tcfg = TrainConfig(
        steps=int(t.steps), batch_size=int(t.batch_size), lr=float(t.lr), min_lr=float(t.min_lr),
        warmup_steps=int(t.warmup_steps), weight_decay=float(t.weight_decay), betas=tuple(float(b) for b in t.betas),
        eps=float(t.eps), grad_clip=float(t.grad_clip), activation_checkpointing=bool(t.activation_checkpointing),
        master_weights=master, peak_flops=float(cfg.metrics.peak_flops), log_every=int(cfg.metrics.log_every),
    )
    if tcfg.steps < 0:
        raise ConfigError(f"train.steps={tcfg.steps} must be >= 0")
    if tcfg.lr <= 0 or tcfg.min_lr < 0:
        raise ConfigError(f"train.lr={tcfg.lr} must be > 0 and train.min_lr={tcfg.min_lr} >= 0")
    return tcfg


def load_tokenizer(cfg: DictConfig, source: ModelSource):
    """The data's tokenizer. From scratch, the model's vocab_size becomes the tokenizer's (so the
    export is inference-ready) unless model.args sets vocab_size explicitly."""
    from pp_runtime.tokenizer import Tokenizer

    where = resolve_path(cfg.data.get("tokenizer")) or source.path
    if where is None:
        raise ConfigError("a model trained from scratch needs a tokenizer: set data.tokenizer=DIR (a folder with tokenizer.model)")
    tok = Tokenizer.from_dir(where)
    explicit = isinstance(cfg.model.get("args"), DictConfig) and cfg.model.args.get("vocab_size") is not None
    if source.path is None and not explicit and tok.vocab_size != source.args.vocab_size:
        source.args = dataclasses.replace(source.args, vocab_size=tok.vocab_size)
    if tok.vocab_size > source.args.vocab_size:
        raise ConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is {source.args.vocab_size}; "
            f"set model.args='{{vocab_size: {tok.vocab_size}}}' (from scratch) or use the model's tokenizer"
        )
    return tok


@dataclass
class Job:
    ctx: ParallelContext
    source: ModelSource
    plan: StagePlan
    schedule: Schedule
    trainer: Trainer
    tokenizer: Any
    data: PackedDataset
    ckpt_root: Path
    resumed_from: Optional[Path]
    metrics_path: Path


def _build_stages(source: ModelSource, plan: StagePlan, ctx: ParallelContext, dtype: torch.dtype,
                  resuming: bool) -> dict[int, StageModule]:
    stages = {}
    for spec in plan.for_rank(ctx.pp_rank):
        if resuming:  # weights come from the checkpoint: allocate only
            with torch.device("meta"):
                m = StageModule(source.args, spec)
            stages[spec.index] = m.to_empty(device=ctx.device).to(dtype)
        else:
            stages[spec.index] = source.build_stage(spec, dtype, ctx.device)
    return stages


def prepare(cfg: DictConfig, ctx: ParallelContext) -> Job:
    """Everything before the first step; raises user errors (checked identically on every rank)."""
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg, source)
    args = source.args
    schedule = make_schedule(cfg, ctx.pp_size)
    tcfg = train_config(cfg)
    check_batch_shape(tcfg.batch_size, ctx.dp_size, schedule.n_microbatches)
    split = cfg.pipeline.get("split")
    plan = plan_for(args, ctx.pp_size, virtual_stages=schedule.virtual_stages,
                    split=list(split) if split is not None else None, training=True, stage_ranks=schedule.stage_ranks)
    data_path = resolve_path(cfg.data.path)
    data = PackedDataset.from_jsonl(data_path, tokenizer, int(cfg.data.seq_len), shuffle=bool(cfg.data.shuffle),
                                    seed=int(cfg.data.seed))
    validate_token_ids(data, args.vocab_size, str(tokenizer.path))
    out_dir = resolve_path(cfg.out_dir)
    ckpt_root = resolve_path(cfg.checkpoint.get("dir")) or out_dir / "checkpoints"
    resume = tc.resolve_resume(cfg.get("resume"), ckpt_root)
    manifest = None
    if resume is not None:
        manifest = tc.read_manifest(resume)
        tc.check_same_model(manifest, args, resume)
    dtype = resolve_dtype(cfg.model.dtype, ctx.device)
    stages = _build_stages(source, plan, ctx, dtype, resuming=resume is not None)
    metrics_path = resolve_path(cfg.metrics.get("file")) or out_dir / "metrics.jsonl"
    trainer = Trainer(ctx, args, schedule, stages, data, tcfg, metrics_path=metrics_path)
    if resume is not None:
        names = [n for n, _ in trainer.named_params]
        weights = tc.load_tensors(resume, names, kind="weights", manifest=manifest, device=ctx.device)
        optim = tc.load_tensors(resume, tc.optim_keys(names), kind="optim", manifest=manifest, device=ctx.device,
                                required=int(manifest["step"]) > 0)
        trainer.load_state(weights, optim, step=int(manifest["step"]), position=int(manifest["data"]["position"]))
        saved_fp = manifest["data"].get("fingerprint")
        if ctx.rank == 0 and saved_fp is not None and saved_fp != data.fingerprint():
            print(f"warning: the data differs from the data the checkpoint was trained on ({saved_fp} vs {data.fingerprint()})",
                  flush=True)
        tc.load_rng(resume, ctx.pp_rank, ctx.device)
    return Job(ctx, source, plan, schedule, trainer, tokenizer, data, ckpt_root, resume, metrics_path)


# ---------------------------------------------------------------------------------- running
def save(job: Job, cfg: DictConfig) -> Path:
    t = job.trainer
    shards = {}
    weights, optim = t.weights_of_record(), t.optimizer_state()
    for s, module in t.stages.items():
        names = {n for n, _ in module.named_parameters()}
        shards[s] = ({n: weights[n] for n in names}, {k: v for k, v in optim.items() if k.rsplit(".", 1)[0] in names})
    return tc.save_train_checkpoint(
        job.ckpt_root, step=t.step_count, shards=shards, stages=job.plan.stages, args=job.source.args,
        rank=job.ctx.rank, pp_rank=job.ctx.pp_rank, dp_rank=job.ctx.dp_rank, position=t.position,
        data={"path": str(resolve_path(cfg.data.path)), "fingerprint": job.data.fingerprint()},
        config=OmegaConf.to_container(cfg, resolve=True), tokenizer=str(job.tokenizer.path),
        keep=int(cfg.checkpoint.keep), device=job.ctx.device,
    )


def _draw_timeline(job: Job, stats: StepStats, path: Path) -> None:
    ctx = job.ctx
    rows = [[(str(a), s, e) for a, s, e in stats.timings]]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rows[0])
        rows = gathered[: ctx.pp_size]  # replica 0's pipeline: global ranks 0 .. pp-1
    if ctx.rank == 0:
        from pp_runtime.timeline import draw_timeline

        path.parent.mkdir(parents=True, exist_ok=True)
        draw_timeline(rows, path, title=f"{job.schedule.name}, step {stats.step} (measured)", schedule=job.schedule)
        print(f"timeline of step {stats.step} written to {path}", flush=True)


def run(cfg: DictConfig) -> int:
    ctx = init_parallel(cfg.pipeline.stages, cfg.pipeline.data_parallel, cfg.device)
    job = agree(ctx, lambda: prepare(cfg, ctx))
    t = job.trainer
    if ctx.rank == 0:
        n_params = sum(p.numel() for p in _meta_model(job.source.args).parameters())
        sim = simulate(job.schedule)
        print(f"model: {n_params / 1e6:.2f}M parameters; {ctx.pp_size} stage(s) x {ctx.dp_size} replica(s), "
              f"schedule {job.schedule.name} with {job.schedule.n_microbatches} micro-batches "
              f"(simulated bubble {sim.bubble_fraction:.3f})\n{job.plan.describe()}", flush=True)
        print(f"data: {len(job.data)} rows of {job.data.seq_len} tokens; "
              + (f"resumed from {job.resumed_from} at step {t.step_count}" if job.resumed_from else "starting at step 0"),
              flush=True)
        if job.resumed_from is None:
            job.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            job.metrics_path.write_text("")
    every = int(cfg.checkpoint.every)
    last_saved: Optional[Path] = job.resumed_from
    saved_step = t.step_count if job.resumed_from is not None else None
    stats = None
    while t.step_count < t.cfg.steps:
        stats = t.step()
        if every > 0 and t.step_count % every == 0 and t.step_count < t.cfg.steps:
            last_saved, saved_step = save(job, cfg), t.step_count
    if saved_step != t.step_count:
        last_saved = save(job, cfg)
    if ctx.rank == 0:
        print(f"checkpoint: {last_saved}", flush=True)
    if cfg.get("timeline") and stats is not None:
        _draw_timeline(job, stats, resolve_path(cfg.timeline))
    if cfg.get("export"):
        if ctx.rank == 0:
            dtype = resolve_dtype(cfg.get("export_dtype") or cfg.model.dtype, ctx.device)  # default: the model dtype
            out = tc.export_checkpoint(last_saved, resolve_path(cfg.export), tokenizer=job.tokenizer.path, dtype=dtype)
            print(f"exported to {out} (params.json, consolidated.safetensors, tokenizer.model)", flush=True)
        if ctx.distributed:
            dist.barrier()
    return 0


def _meta_model(args: ModelArgs) -> StageModule:
    from pp_runtime.checkpoint import full_spec

    with torch.device("meta"):
        return StageModule(args, full_spec(args))
