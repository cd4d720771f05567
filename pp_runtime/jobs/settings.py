"""The jobs' settings as typed dataclasses: the one source of every default and its documentation.

Each job's config (`conf/<job>.yaml`) starts from its schema here (`InferSettings`, `BatchSettings`,
`FinetuneSettings`, registered with Hydra's ConfigStore), so Hydra checks each override's type and
`--cfg job` shows every setting. YAML keeps only presets (model, schedule) and experiments. A job
converts its composed config once, with `to_settings`, and below that sees these objects only.
Groups the library owns are its own dataclasses: `inference` is the engine's `InferenceConfig`,
`sampling` is `SamplingParams`, `train` extends the trainer's `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from pp_runtime.errors import ConfigError
from pp_runtime.inference.engine import InferenceConfig
from pp_runtime.inference.sampling import SamplingParams
from pp_runtime.training.lora import ATTENTION_TARGETS, LoraConfig, lora_config
from pp_runtime.training.trainer import PEAK_FLOPS_H200_BF16, TrainConfig


# ---------------------------------------------------------------------------------- groups
@dataclass
class ModelSettings:
    """Which weights: a checkpoint folder, a seeded random preset, or (neither) the embedded demo model.
    The presets in conf/model/ set `path` (null, or ??? where the user must name the folder)."""

    path: Optional[str] = MISSING  # checkpoint folder: Mistral consolidated or Hugging Face format
    tokenizer: Optional[str] = None  # tokenizer.model (or its folder); default: the one in model.path
    adapter: Optional[str] = None  # inference: a LoRA adapter in PEFT format, merged into the weights at load
    chat: str = "auto"  # template of chat "messages" inputs (mistral-common): auto (by the tokenizer), v1, v3
    preset: Optional[str] = None  # random weights of a preset shape (tiny, tiny-moe, mistral-7b, mixtral-8x7b)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    seed: int = 0  # weights of a random `preset`


@dataclass
class TrainingModelSettings(ModelSettings):
    """Fine-tuning also trains from scratch: `params` (a Mistral params.json) or `preset`, with `args`
    overriding single fields, e.g. model.args='{dim: 128, n_layers: 4}'."""

    params: Optional[str] = None
    args: Optional[Any] = None  # a mapping of params.json fields


@dataclass
class PipelineSettings:
    """The `pipeline` group: world = stages x data_parallel processes (torchrun --nnodes x --nproc_per_node)."""

    stages: Optional[int] = None  # default: world size / data_parallel
    data_parallel: int = 1  # replicas of the whole pipeline (fine-tuning: gradients summed across them)
    split: Any = None  # explicit layers per (virtual) stage, e.g. [9,8,8,7]; default: the cost-balanced
    #                    partition (any value type here: jobs.config.split_from_config says what is wrong)


@dataclass
class ScheduleSettings:
    """The `schedule` group (presets in conf/schedule/: gpipe, 1f1b, interleaved, zb-h1, zb-v, interleaved-zb)."""

    name: str = "1f1b"
    microbatches: int = 4  # per step and replica
    virtual_stages: int = 1  # stages per rank (2 for interleaved and ZB-V)
    file: Optional[str] = None  # a user schedule (JSON of per-rank actions, pp_runtime/training/schedules.py);
    #                             replaces the built-in one; validated before training starts


@dataclass
class DataSettings:
    path: Optional[str] = None  # JSONL: {"text"} lines (loss on every token) or {"prompt", "completion"} lines
    #                             (loss on the completion only); null: the demo task's questions (demo model only)
    demo_questions: int = 20000  # with path=null: how many training questions to generate (from seed)
    tokenizer: Optional[str] = None  # tokenizer.model or its folder; default: model.tokenizer, then model.path
    seq_len: int = 64  # tokens per packed row; documents are packed whole, longer ones are cut
    shuffle: bool = True  # reshuffle the rows every epoch (deterministic, from seed)
    seed: int = 0


@dataclass
class LoraSettings:
    """`train.lora`: freeze the model, train low-rank adapters (pp_runtime/training/lora.py)."""

    rank: Optional[int] = 0  # adapter rank; 0 or null = off (full fine-tune)
    alpha: Optional[float] = None  # adapters add alpha/rank * B A x; null = 2 x rank
    dropout: float = 0.0  # dropout on the adapters' input while training
    targets: List[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))  # wq/wk/wv/wo and/or w1/w2/w3
    #                     (the feed-forward: a dense model's, or every expert's in a MoE model)
    seed: int = 0  # initial A matrices (B starts at zero, so step 0 is the base model)

    def __post_init__(self) -> None:
        self.config()  # a bad value fails at conversion, before any work

    def config(self) -> Optional[LoraConfig]:
        """The adapters' settings, or None when LoRA is off."""
        return lora_config(dataclasses.asdict(self))


@dataclass
class TrainSettings(TrainConfig):
    """The `train` group: the trainer's own settings (pp_runtime/training/trainer.py) plus the job's."""

    memory_check: bool = True  # rank 0 prints each rank's estimated memory; on GPU a rank that would not
    #                            fit stops the run before training
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class MetricsSettings:
    file: Optional[str] = None  # JSONL of per-step metrics; default OUT_DIR/metrics.jsonl (loss.png beside it)
    log_every: int = 10  # rank 0: a progress bar on a terminal, else a line every N steps; also how often
    #                      per-rank figures (bubble, peak memory) are gathered for the loggers
    peak_flops: float = PEAK_FLOPS_H200_BF16  # per-GPU peak used for MFU (measured bf16 matmul on H200)
    tensorboard: bool = False  # TensorBoard event files in OUT_DIR/tensorboard (pip install tensorboard)
    wandb: Optional[str] = None  # a Weights & Biases project to log the same to (pip install wandb)


@dataclass
class CheckpointSettings:
    dir: Optional[str] = None  # default OUT_DIR/checkpoints; one step_XXXXXXXX folder per save
    every: int = 0  # save every N steps; 0 = only at the end (the end is always saved)
    keep: int = 2  # complete checkpoints to keep (older ones are deleted)


@dataclass
class EvalSettings:
    """After the export: answer questions greedily with it and print the exact-match accuracy."""

    path: Optional[str] = None  # JSONL of {"prompt", "completion"}; null: with the demo task its held-out
    #                             questions, else no evaluation
    demo_questions: int = 200  # how many held-out demo questions (never in any training set)


# ---------------------------------------------------------------------------------- jobs
@dataclass
class GenerationSettings:
    """What launch/infer.py and launch/batch_infer.py share."""

    model: ModelSettings = field(default_factory=ModelSettings)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # per-request JSONL fields override it
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input: Optional[str] = None
    output: Optional[str] = None
    max_new_tokens: int = 32  # default for requests that do not set max_new_tokens / max_tokens
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # rank 0, input files: a tqdm bar on a terminal, plain lines otherwise
    progress_interval: float = 30.0  # seconds between plain progress lines (logs, SLURM)


@dataclass
class InferSettings(GenerationSettings):
    """launch/infer.py: `prompt` (one text) or `input` (JSONL of {"id", "prompt"}); results to `output`
    (JSONL) or the console."""

    prompt: Optional[str] = None


@dataclass
class BatchSettings(GenerationSettings):
    """launch/batch_infer.py: resumable; re-running the same command finishes the remaining lines."""

    errors: Optional[str] = None  # rejected lines (line number + reason); default: <output>.errors.jsonl
    overwrite: bool = False  # discard an earlier run's results in output= (else a rerun resumes them, and
    #                          refuses when they were made from another input or other settings)
    strict: bool = False  # any bad input line stops the job (every rank, non-zero exit) before generating


@dataclass
class FinetuneSettings:
    """launch/finetune.py. The defaults are the demo run (the embedded model on its task's questions);
    real runs start from an experiment (conf/experiment/) or set model, data and train.* themselves."""

    model: TrainingModelSettings = field(default_factory=TrainingModelSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    device: str = "auto"  # auto | cpu | cuda
    out_dir: Optional[str] = None  # metrics, checkpoints, export; null: checkpoint.dir when given, else a new
    #                                outputs/finetune/DATE_TIME; give out_dir=DIR to resume a run
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    timeline: Optional[str] = None  # PNG drawn from the measured times of the last step
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    resume: Optional[str] = "auto"  # auto: continue checkpoint.dir's latest checkpoint of the same run;
    #                                 null: start fresh (removing them); or a step_* folder to continue
    export: Optional[str] = "auto"  # inference-ready export at the end: auto = OUT_DIR/export; null = none; or DIR
    export_dtype: Optional[str] = None  # dtype of the exported weights (default: model.dtype)
    export_format: str = "consolidated"  # consolidated (LoRA merged) | peft (LoRA only: the adapter alone)
    eval: EvalSettings = field(default_factory=EvalSettings)


SCHEMAS = {"infer": InferSettings, "batch_infer": BatchSettings, "finetune": FinetuneSettings}

# what a value left as ??? needs, by key
MISSING_VALUES = {
    "model.path": "this model config needs its checkpoint folder: set model.path=DIR",
    "data.path": "set data.path=FILE.jsonl: without it the job trains on the demo task's questions (data.path=null), "
                 "which only the embedded demo model can read",
}


def register_schemas() -> None:
    """Each job's schema (`<job>_schema`, first in its defaults list) and the groups that have no YAML
    options of their own (`inference`, `pipeline`, `sampling`: `group=default` in the defaults lists)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for job, schema in SCHEMAS.items():
        cs.store(name=f"{job}_schema", node=_writable(schema))
    for group, schema in (("inference", InferenceConfig), ("pipeline", PipelineSettings), ("sampling", SamplingParams)):
        cs.store(group=group, name="default", node=_writable(schema))


def _writable(schema: type) -> DictConfig:
    """The schema as a config node that overrides may change: a frozen dataclass (the engine's
    InferenceConfig, SamplingParams) would make its node read-only."""
    node = OmegaConf.structured(schema)

    def clear(n: DictConfig) -> None:
        OmegaConf.set_readonly(n, None)
        for key in n.keys():
            if not OmegaConf.is_missing(n, key) and isinstance(n[key], DictConfig):
                clear(n[key])

    clear(node)
    return node


def top_level_keys(job: str) -> dict[str, bool]:
    """The job's top-level keys, each with whether it is a group (a nested settings dataclass)."""
    hints = typing.get_type_hints(SCHEMAS[job])
    return {f.name: dataclasses.is_dataclass(hints[f.name]) for f in dataclasses.fields(SCHEMAS[job])}


# ---------------------------------------------------------------------------------- conversion
def to_settings(cfg: Any, job: str) -> Any:
    """The composed config as the job's settings object, every group's checks run (its __post_init__).
    Settings objects pass through, so a job's `run` takes either."""
    schema = SCHEMAS[job]
    if isinstance(cfg, schema):
        return cfg
    return _build(schema, cfg, "")


def _build(cls: type, node: DictConfig, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        if f.name not in node.keys():  # (`in node` is false for a ??? value)
            continue
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(MISSING_VALUES.get(key, f"{key} has no value (???): set {key}=..."))
        value = node[f.name]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, DictConfig):
            values[f.name] = _build(kind, value, f"{key}.")
        else:
            values[f.name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return cls(**values)


def explain_bad_value(root: str, full_key: str, value: Any) -> Optional[str]:
    """A value Hydra could not convert to its field's type, as the field's own check words it: the
    owning dataclass is built with that one value and its __post_init__ says what is wrong (e.g.
    `sampling.temperature='hot' is not a finite number`). None when no check objects."""
    cls: Any = SCHEMAS.get(root)
    *path, name = full_key.split(".")
    for part in path:
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    if cls is None or not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    try:
        cls(**{name: value})
    except ConfigError as e:
        return str(e)
    except (TypeError, ValueError):
        return None
    return None
