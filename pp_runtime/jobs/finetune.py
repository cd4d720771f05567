"""The `launch/finetune.py` job: pipelined training from a Hydra config (settings: pp_runtime/jobs/settings.py).

Everything that can fail on user input (model config, schedule, batch shape, tokenizer, data
file, resume checkpoint) is checked on every rank before training starts; the ranks then compare
notes, so a problem found on any rank stops all of them with the same one-line message and a
non-zero exit instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from pp_runtime.checkpoints.model_source import DEMO_DIR, ModelSource, resolve_dtype
from pp_runtime.distributed.parallel import ParallelContext, agree, init_parallel
from pp_runtime.distributed.threads import startup_line
from pp_runtime.errors import CheckpointError, ConfigError
from pp_runtime.io.output_files import check_output_dir
from pp_runtime.jobs.config import model_source, resolve_path, split_from_config
from pp_runtime.jobs.settings import FinetuneSettings, TrainingModelSettings, to_settings
from pp_runtime.jobs.evaluate import Question, demo_questions, evaluate, read_questions
from pp_runtime.jobs.run_definition import differences, run_definition
from pp_runtime.jobs.run_folder import choose_out_dir, export_dir
from pp_runtime.model.args import ModelArgs, preset
from pp_runtime.model.partition import StagePlan, plan_for
from pp_runtime.model.transformer import StageModule
from pp_runtime.training import lora
from pp_runtime.training import checkpoint as tc
from pp_runtime.training.data import PackedDataset, check_batch_shape, validate_token_ids
from pp_runtime.training.memory_plan import MemoryPlan, device_free_bytes, plan_memory
from pp_runtime.training.metrics import MetricSinks, check_loggers, draw_loss_curve
from pp_runtime.training.progress import TrainProgress
from pp_runtime.training.schedules import Schedule, build_schedule, check_microbatches, load_schedule
from pp_runtime.training.simulator import simulate
from pp_runtime.training.trainer import StepStats, TrainConfig, Trainer, truncate_metrics

if TYPE_CHECKING:
    from omegaconf import DictConfig


# ---------------------------------------------------------------------------------- pieces
def training_source(model: TrainingModelSettings) -> ModelSource:
    """Pretrained checkpoint (`model.path`), or a from-scratch architecture (`model.params` /
    `model.preset`, with `model.args` overriding single fields)."""
    overrides = model.args
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"model.args must be a mapping of params.json fields, e.g. model.args='{{dim: 64}}', got {overrides!r}")
    if model.path:
        if overrides:
            raise ConfigError("model.args only applies to training from scratch; a checkpoint (model.path) fixes the architecture")
        return model_source(model)
    params = resolve_path(model.params)
    if params is not None:
        if not params.is_file():
            raise ConfigError(f"model.params={str(params)!r} does not exist; give a params.json file")
        try:
            base = json.loads(params.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.params {params} is not valid JSON ({e})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"model.params {params} must hold a JSON object of model fields")
    elif model.preset:
        base = preset(model.preset).to_params_json()
    elif overrides:
        raise ConfigError("model.args needs a model trained from scratch: model.params=FILE or model.preset=NAME")
    else:
        return model_source(model)  # the embedded demo model
    fields = {**base, **(overrides or {})}
    known = set(ModelArgs.__dataclass_fields__) | {"moe"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"model.args has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        args = ModelArgs.from_params_json(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad model fields {fields}: {e}") from None
    return ModelSource(args, None, model.seed)


def make_schedule(cfg: FinetuneSettings, pp_size: int) -> Schedule:
    sc = cfg.schedule
    if sc.file:
        schedule = load_schedule(resolve_path(sc.file))
        if schedule.n_ranks != pp_size:
            raise ConfigError(f"schedule file {sc.file} is for {schedule.n_ranks} ranks but the pipeline has {pp_size} stages")
    else:
        check_microbatches(sc.name, pp_size, sc.microbatches)
        schedule = build_schedule(sc.name, pp_size, sc.microbatches, sc.virtual_stages)
    simulate(schedule)  # rejects incomplete, mis-ordered or deadlocking schedules with the step it hangs at
    return schedule


def training_tokenizer(cfg: FinetuneSettings, source: ModelSource):
    """The data's tokenizer. From scratch, the model's vocab_size becomes the tokenizer's (so the
    export is inference-ready) unless model.args sets vocab_size explicitly."""
    from pp_runtime.io.tokenizer import Tokenizer

    where = resolve_path(cfg.data.tokenizer or cfg.model.tokenizer) or source.path
    if where is None:
        raise ConfigError("a model trained from scratch needs a tokenizer: set data.tokenizer=PATH (tokenizer.model "
                          "or its folder; model.tokenizer= works too)")
    tok = Tokenizer.from_dir(where)
    explicit = isinstance(cfg.model.args, dict) and cfg.model.args.get("vocab_size") is not None
    if source.path is None and not explicit and tok.vocab_size != source.args.vocab_size:
        source.args = dataclasses.replace(source.args, vocab_size=tok.vocab_size)
    if tok.vocab_size > source.args.vocab_size:
        raise ConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is {source.args.vocab_size}; "
            f"set model.args='{{vocab_size: {tok.vocab_size}}}' (from scratch) or use the model's tokenizer"
        )
    return tok


def load_data(cfg: FinetuneSettings, tokenizer, source: ModelSource) -> PackedDataset:
    """`data.path`'s JSONL; without one, the demo task's generated questions (demo model only)."""
    d = cfg.data
    seq_len, max_len = d.seq_len, source.args.max_seq_len
    if seq_len > max_len:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's max_seq_len={max_len}; "
                          f"use data.seq_len<={max_len}")
    if d.path is None:
        if source.path != DEMO_DIR:
            raise ConfigError("set data.path=FILE.jsonl: without it the job trains on the demo task's questions, "
                              "which only the embedded demo model (model=demo) can read")
        from pp_runtime.demo import task

        records = [e.to_train_json() for e in task.train_examples(d.demo_questions, seed=d.seed)]
        return PackedDataset.from_records(records, tokenizer, d.seq_len, shuffle=d.shuffle, seed=d.seed,
                                          source="demo question")
    return PackedDataset.from_jsonl(resolve_path(d.path), tokenizer, d.seq_len, shuffle=d.shuffle, seed=d.seed)


def eval_questions(cfg: FinetuneSettings) -> list[Question]:
    """What the export answers at the end: `eval.path`, or with the demo task its held-out questions."""
    has_export = export_dir(cfg, Path(cfg.out_dir)) is not None
    if cfg.eval.path:
        if not has_export:
            raise ConfigError("eval.path is answered with the export: keep export=auto (or give export=DIR)")
        return read_questions(resolve_path(cfg.eval.path))
    if cfg.data.path is None and has_export:
        return demo_questions(cfg.eval.demo_questions)
    return []


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
    definition: dict[str, Any]  # what makes this run this run (run_definition), stored in every manifest
    lora: Optional[lora.LoraConfig]  # LoRA adapters on a frozen base (train.lora.rank > 0), else None
    notes: list[str]  # start-up remarks for rank 0 to print
    questions: list[Question]
    export_format: str = "consolidated"  # or "peft" (LoRA only): the adapter alone, in PEFT's format


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


def prepare(cfg: FinetuneSettings, ctx: ParallelContext) -> Job:
    """Everything before the first step; raises user errors (checked identically on every rank)."""
    if cfg.data.path == "":  # null: the demo task
        raise ConfigError("fine-tuning needs data.path=FILE.jsonl ({\"text\": ...} or {\"prompt\", \"completion\"} lines)")
    source = training_source(cfg.model)
    tokenizer = training_tokenizer(cfg, source)
    args = source.args
    schedule = make_schedule(cfg, ctx.pp_size)
    tcfg = cfg.train
    check_batch_shape(tcfg.batch_size, ctx.dp_size, schedule.n_microbatches)
    plan = plan_for(args, ctx.pp_size, virtual_stages=schedule.virtual_stages,
                    split=split_from_config(cfg.pipeline.split), training=True,
                    stage_ranks=schedule.stage_ranks)
    data = load_data(cfg, tokenizer, source)
    validate_token_ids(data, args.vocab_size, str(tokenizer.path))
    out_dir = resolve_path(cfg.out_dir)
    ckpt_root = resolve_path(cfg.checkpoint.dir) or out_dir / "checkpoints"
    check_output_dir(out_dir, "out_dir")  # before any step: an unwritable folder must not cost the training
    check_output_dir(ckpt_root, "checkpoint.dir")
    dtype = resolve_dtype(cfg.model.dtype, ctx.device)
    if tcfg.optimizer == "cpu_adam" and dtype == torch.float64:
        raise ConfigError("train.optimizer=cpu_adam keeps float32 master weights (DeepSpeed's CPU Adam); "
                          "use model.dtype=float32 or bfloat16, or train.optimizer=adamw for float64")
    lcfg = tcfg.lora.config()
    export_format = lora.export_format(cfg, lcfg)
    if cfg.model.adapter:
        raise ConfigError("model.adapter applies to inference (launch/infer.py, batch_infer.py); to fine-tune a merged "
                          "model, export it first, or train a new adapter with train.lora.rank=N")
    definition = run_definition(cfg, source, data, dtype, lcfg)
    resume = tc.resolve_resume(cfg.resume, ckpt_root)
    manifest, notes = None, []
    if resume is not None:
        manifest = tc.read_manifest(resume)
        tc.check_same_model(manifest, args, resume)
        changed = differences(manifest.get("run"), definition)
        if changed and cfg.resume == "auto":
            raise CheckpointError(
                f"{ckpt_root} holds another run (step {manifest['step']}; {'; '.join(changed)}); resume=auto only "
                "continues the same run: give this one its own out_dir= (or checkpoint.dir=), or pass resume=null "
                f"to start over there (its checkpoints are removed), or resume={resume} to continue that checkpoint "
                "with the new settings"
            )
        if changed:
            notes.append(f"note: resuming {resume} with settings that differ from the run that saved it: {'; '.join(changed)}")
    memory = memory_plan(cfg, args, plan, schedule, tcfg, ctx, dtype, lcfg)
    notes.append(memory.describe())
    if tcfg.zero and ctx.dp_size == 1:
        notes.append("note: train.zero=1 with one replica shards nothing (pipeline.data_parallel=1)")
    free = device_free_bytes(ctx.device)
    if free is not None and tcfg.memory_check:
        memory.check(ctx.pp_rank, free, pp_size=ctx.pp_size, dp_size=ctx.dp_size)
    # with LoRA the frozen base weights come from the model source also when resuming (checkpoints hold adapters)
    stages = _build_stages(source, plan, ctx, dtype, resuming=resume is not None and lcfg is None)
    if lcfg is not None:
        lora.apply_to_stages(stages, lcfg, source.args)
    metrics_path = resolve_path(cfg.metrics.file) or out_dir / "metrics.jsonl"
    check_loggers(cfg.metrics)
    questions = eval_questions(cfg)
    trainer = Trainer(ctx, args, schedule, stages, data, tcfg, metrics_path=metrics_path, console=False,
                      peak_flops=cfg.metrics.peak_flops)
    if lcfg is not None:  # MFU: the frozen weights get no gradient
        trainer.flops_per_token = lora.flops_per_token(args, data.seq_len)
    if resume is not None:
        names = [n for n, _ in trainer.named_params]
        # the flat step keeps a slice of the state: read the full tensors into host memory, not the device
        where = torch.device("cpu") if trainer.flat is not None else ctx.device
        weights = tc.load_tensors(resume, names, kind="weights", manifest=manifest, device=where)
        if lcfg is not None:  # resume=DIR with another rank: say so instead of failing in a copy
            lora.check_resumed_shapes(weights, trainer.named_params, resume)
        optim = tc.load_tensors(resume, tc.optim_keys(names), kind="optim", manifest=manifest, device=where,
                                required=int(manifest["step"]) > 0)
        trainer.load_state(weights, optim, step=int(manifest["step"]), position=int(manifest["data"]["position"]))
        tc.load_rng(resume, ctx.pp_rank, ctx.device)
    return Job(ctx, source, plan, schedule, trainer, tokenizer, data, ckpt_root, resume, metrics_path,
               definition, lcfg, notes, questions, export_format)


# ---------------------------------------------------------------------------------- running
def save(job: Job, cfg: FinetuneSettings) -> Path:
    t = job.trainer
    shards = {}
    weights, optim = t.weights_of_record(), t.optimizer_state()  # collective under ZeRO-1 ({} on replicas > 0)
    for s, module in t.stages.items():
        names = {n for n, p in module.named_parameters() if p.requires_grad}  # LoRA: the adapters only
        shards[s] = ({n: weights[n] for n in names if n in weights},
                     {k: v for k, v in optim.items() if k.rsplit(".", 1)[0] in names})
    return tc.save_train_checkpoint(
        job.ckpt_root, step=t.step_count, shards=shards, stages=job.plan.stages, args=job.source.args,
        rank=job.ctx.rank, pp_rank=job.ctx.pp_rank, dp_rank=job.ctx.dp_rank, position=t.position,
        data={"path": str(resolve_path(cfg.data.path)) if cfg.data.path else "demo task",
              "fingerprint": job.data.fingerprint()},
        config=_plain(cfg), tokenizer=str(job.tokenizer.path),
        keep=cfg.checkpoint.keep, device=job.ctx.device, extra={"run": job.definition},
    )


def _draw_timeline(job: Job, stats: StepStats, path: Path) -> None:
    ctx = job.ctx
    rows = [[(str(a), s, e) for a, s, e in stats.timings]]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rows[0])
        rows = gathered[: ctx.pp_size]  # replica 0's pipeline: global ranks 0 .. pp-1
    if ctx.rank == 0:
        from pp_runtime.training.timeline import draw_timeline

        path.parent.mkdir(parents=True, exist_ok=True)
        draw_timeline(rows, path, title=f"{job.schedule.name}, step {stats.step} (measured)", schedule=job.schedule)
        print(f"timeline of step {stats.step} written to {path}", flush=True)


def run(cfg: "FinetuneSettings | DictConfig") -> int:
    cfg = to_settings(cfg, "finetune")
    ctx = init_parallel(cfg.pipeline.stages, cfg.pipeline.data_parallel, cfg.device)
    out_dir = choose_out_dir(cfg, ctx)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    job = agree(ctx, lambda: prepare(cfg, ctx))
    t = job.trainer
    if ctx.rank == 0:
        n_params = sum(p.numel() for p in _meta_model(job.source.args).parameters())
        sim = simulate(job.schedule)
        print(f"model: {n_params / 1e6:.2f}M parameters; {ctx.pp_size} stage(s) x {ctx.dp_size} replica(s), "
              f"schedule {job.schedule.name} with {job.schedule.n_microbatches} micro-batches "
              f"(simulated bubble {sim.bubble_fraction:.3f})\n{job.plan.describe()}\n{startup_line()}", flush=True)
        if job.lora is not None:
            print(lora.describe(job.lora, job.source.args), flush=True)
        for note in job.notes:
            print(note, flush=True)
        print(f"data: {len(job.data)} rows of {job.data.seq_len} tokens; "
              + (f"resumed from {job.resumed_from} at step {t.step_count}" if job.resumed_from else "starting at step 0"),
              flush=True)
        print(f"output folder: {out_dir}", flush=True)
        if job.resumed_from is None:
            _remove_earlier_run(job.ckpt_root)
        job.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(job.metrics_path, t.step_count if job.resumed_from is not None else 0)
        if job.resumed_from is not None and t.step_count >= t.cfg.steps:
            print(f"nothing left to do: the checkpoint is at step {t.step_count} and train.steps={t.cfg.steps}; "
                  "raise train.steps to train further", flush=True)
    every = cfg.checkpoint.every
    last_saved: Optional[Path] = job.resumed_from
    saved_step = t.step_count if job.resumed_from is not None else None
    first_step = t.step_count
    stats = None
    progress = TrainProgress(t.cfg.steps, t.step_count, cfg.metrics.log_every) if ctx.rank == 0 else None
    sinks = MetricSinks(ctx, cfg.metrics, out_dir, _plain(cfg), t.step_count)
    while t.step_count < t.cfg.steps:
        stats = t.step()
        sinks.record(stats)
        if progress is not None:
            progress.update(stats)
        if every > 0 and t.step_count % every == 0 and t.step_count < t.cfg.steps:
            last_saved, saved_step = save(job, cfg), t.step_count
            if ctx.rank == 0:
                print(f"checkpoint: step {t.step_count} saved to {last_saved}", flush=True)
    if progress is not None:
        progress.close()
    sinks.close()
    if saved_step != t.step_count:
        last_saved = save(job, cfg)
    if ctx.rank == 0:
        print(f"checkpoint: {last_saved}", flush=True)
        curve = draw_loss_curve(job.metrics_path, job.metrics_path.parent / "loss.png")
        if curve is not None:
            print(f"loss curve: {curve}", flush=True)
    if cfg.timeline and stats is not None:
        _draw_timeline(job, stats, resolve_path(cfg.timeline))
    export = export_dir(cfg, out_dir)
    if export is not None:
        if ctx.rank == 0:
            dtype = resolve_dtype(cfg.export_dtype or cfg.model.dtype, ctx.device)  # default: the model dtype
            if job.export_format == "peft":
                from pp_runtime.training.peft_export import export_peft

                out = export_peft(last_saved, export, dtype=resolve_dtype(cfg.export_dtype, ctx.device)
                                  if cfg.export_dtype else None)
                try_it = (f"launch/infer.py model.path={job.source.path} model.adapter={out}" if job.source.path
                          else f"launch/infer.py model=random model.preset=... model.adapter={out}")
                print(f"exported step {t.step_count}'s LoRA adapter to {out} (PEFT format: adapter_config.json, "
                      f"adapter_model.safetensors)" + _export_provenance(first_step, t.step_count, job.resumed_from)
                      + f"; try: {try_it}", flush=True)
            else:
                out = tc.export_checkpoint(last_saved, export, tokenizer=job.tokenizer.path, dtype=dtype)
                merged = " with the LoRA adapters merged" if job.lora is not None else ""
                print(f"exported step {t.step_count} to {out} (params.json, consolidated.safetensors, tokenizer.model)"
                      + merged + _export_provenance(first_step, t.step_count, job.resumed_from)
                      + f"; try: launch/infer.py model.path={out}", flush=True)
        if ctx.distributed:
            dist.barrier()
        if job.questions:
            _evaluate_export(job, cfg, export, out_dir)
    return 0


def _remove_earlier_run(ckpt_root: Path) -> None:
    """A fresh start owns its checkpoint folder: an earlier run's later steps would otherwise be taken
    for this run's latest (by resume=auto) or outlive this run's own saves (checkpoint.keep)."""
    earlier = tc.list_checkpoints(ckpt_root)
    if earlier:
        for path in earlier:
            shutil.rmtree(path)
        print(f"resume=null: removed {len(earlier)} checkpoint(s) of an earlier run from {ckpt_root}", flush=True)


def _export_provenance(first_step: int, last_step: int, resumed_from: Optional[Path]) -> str:
    """Say so when the exported weights come from no step of this invocation."""
    if last_step > first_step:
        return ""
    if resumed_from is not None:
        return f"; no step ran now: these are the weights of {resumed_from}"
    return "; no step ran (train.steps=0): these are the starting weights"


def _evaluate_export(job: Job, cfg: FinetuneSettings, export: Path, out_dir: Path) -> None:
    """Answer the eval questions with the export on this job's ranks; rank 0 prints the accuracy."""
    ctx = job.ctx
    dtype = resolve_dtype(cfg.export_dtype or cfg.model.dtype, ctx.device)
    if job.export_format == "peft":  # the base model with the adapter applied at load, as inference does
        if job.source.path is None:
            if ctx.rank == 0:
                print("eval: skipped (a PEFT export of a model trained from scratch has no base folder to load)", flush=True)
            return
        result = evaluate(ctx, job.source.path, job.questions, dtype, adapter=export)
    else:
        result = evaluate(ctx, export, job.questions, dtype)
    if result is None:
        return
    where = out_dir / "eval.jsonl"
    result.write(where)
    name = "held-out demo questions" if not cfg.eval.path else cfg.eval.path
    print(f"eval: {result.summary()} of {name} answered exactly by the export (answers in {where})", flush=True)
    for r in result.results[:5]:
        print(f"  {r['prompt']!r} -> {r['completion']!r} " + ("ok" if r["ok"] else f"WRONG, expected {r['expected']!r}"),
              flush=True)




def memory_plan(cfg: FinetuneSettings, args: ModelArgs, plan: StagePlan, schedule: Schedule, tcfg: TrainConfig,
                ctx: ParallelContext, dtype: torch.dtype, lcfg: Optional[lora.LoraConfig]) -> MemoryPlan:
    """The start-up memory estimate of every pipeline rank (pp_runtime/training/memory_plan.py); with LoRA only
    the adapters train."""
    rows = tcfg.batch_size // (ctx.dp_size * schedule.n_microbatches)
    trainable = None if lcfg is None else [
        sum(lora.parameter_counts(args, lcfg, spec)[1] for spec in plan.for_rank(r)) for r in range(plan.n_ranks)]
    return plan_memory(args, plan, schedule, dtype=dtype, tokens_per_microbatch=rows * cfg.data.seq_len,
                       dp_size=ctx.dp_size, zero=bool(tcfg.zero), optimizer=tcfg.optimizer, master=tcfg.master_weights,
                       activation_checkpointing=tcfg.activation_checkpointing, trainable=trainable)


def _plain(cfg: FinetuneSettings) -> dict[str, Any]:
    """The settings as JSON-ready data (checkpoint manifests, the loggers' run config)."""
    return dataclasses.asdict(cfg)


def _meta_model(args: ModelArgs) -> StageModule:
    from pp_runtime.checkpoints.formats import full_spec

    with torch.device("meta"):
        return StageModule(args, full_spec(args))
