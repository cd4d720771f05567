"""Hydra configuration: compose a job's config from `conf/` plus command-line overrides, check a whole
Hydra command line before Hydra runs it (so a mistake is one `error:` line, exit 2), and turn the
config's model and pipeline groups into the library's own objects (nothing below jobs/ sees Hydra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pp_runtime.errors import ConfigError

if TYPE_CHECKING:
    from argparse import Namespace

    from omegaconf import DictConfig

    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.distributed.parallel import ParallelContext
    from pp_runtime.model.args import ModelArgs
    from pp_runtime.model.partition import StagePlan

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class PipelineConfig:
    """The `pipeline` group: world = stages x data_parallel processes (torchrun --nnodes x --nproc_per_node)."""

    stages: Optional[int] = None  # default: world size / data_parallel
    data_parallel: int = 1  # replicas of the whole pipeline (fine-tuning: gradients summed across them)
    split: Any = None  # explicit layers per (virtual) stage, e.g. [9,8,8,7]; default: the cost-balanced
    #                    partition (any value type here: split_from_config says what is wrong with it)


def register_schemas() -> None:
    """The config groups whose single source of defaults is a dataclass: `inference` (the engine's
    InferenceConfig) and `pipeline`. conf/ holds no YAML for them; `inference=default` and
    `pipeline=default` in the jobs' defaults lists find these, and Hydra checks overrides' types."""
    from hydra.core.config_store import ConfigStore

    from pp_runtime.inference.engine import InferenceConfig

    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    inference = OmegaConf.structured(InferenceConfig)
    OmegaConf.set_readonly(inference, False)  # the dataclass is frozen; overrides must still apply
    cs.store(group="inference", name="default", node=inference)
    cs.store(group="pipeline", name="default", node=PipelineConfig)


def load_config(job: str, overrides: Sequence[str], conf_dir: Path = CONF_DIR, config_name: Optional[str] = None,
                config_dir: Optional[str] = None) -> "DictConfig":
    """Compose `conf/<job>.yaml` (or `config_name`, also looked up in `config_dir`) with overrides,
    exactly as Hydra's command line would; any problem becomes a one-line ConfigError."""
    from omegaconf import OmegaConf, open_dict

    cfg = _compose(job, list(overrides), conf_dir, config_name or job, config_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, True)
    _check_top_level_keys(cfg, job, conf_dir)
    return cfg


def _check_top_level_keys(cfg: "DictConfig", job: str, conf_dir: Path) -> None:
    """Hydra merges whatever an added config sets: an experiment written for another job (or a
    `+key=...` typo) would otherwise ride along unused."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(conf_dir / f"{job}.yaml")
    known = {k for k in base.keys() if k not in ("defaults", "hydra")} | {next(iter(d)) for d in base.get("defaults", [])
                                                                          if not isinstance(d, str)}
    unknown = [k for k in cfg.keys() if k not in known]
    if unknown:
        raise ConfigError(f"the config sets {', '.join(map(str, unknown))}, which {job} does not have (an experiment "
                          f"for another job, or a typo?); known keys: {_known_keys(job, conf_dir)}")


def _compose(job: str, overrides: list[str], conf_dir: Path, config_name: str, config_dir: Optional[str]) -> "DictConfig":
    """Hydra's own composition (search path: Hydra's configs, conf/, then `config_dir` as --config-dir adds it)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    version.setbase("1.3")
    register_schemas()
    search_path = create_config_search_path(str(conf_dir))
    if config_dir is not None:
        extra = Path(config_dir).expanduser().resolve()
        if not extra.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: {extra} is not a folder")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name=job, config_search_path=search_path)
        return hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN)
    except (HydraException, OmegaConfBaseException) as e:
        raise _config_error(e, job, conf_dir) from None
    finally:
        GlobalHydra.instance().clear()


def _config_error(e: Exception, job: str, conf_dir: Path) -> ConfigError:
    text = str(e).strip()
    if text.startswith("Error merging override") and e.__cause__ is not None:  # say why (a wrong type, ...)
        text = f"{text}: {str(e.__cause__).strip().splitlines()[0]}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    hint = ""
    if "Could not override" in text or "not in struct" in text:
        hint = f"; known keys: {_known_keys(job, conf_dir)}"
    elif "Error parsing override" in text:
        hint = """; quote a value that holds '=' or brackets, e.g. 'prompt="1+1="'"""
    elif "Ambiguous value" in text:
        hint = "; quote it for a string ('key=\"a,b\"'), use key=[a,b] for a list, or add --multirun to sweep"
    elif "Available options" in text:
        at = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = []
        for ln in lines[at + 1:]:
            if ln.endswith(":"):  # "Config search path:" follows the options
                break
            options.append(ln)
        hint = "; choose one of " + ", ".join(options)
    return ConfigError(f"bad override: {first}{hint}")


def _known_keys(job: str, conf_dir: Path) -> str:
    """Top-level keys of the job plus its config groups (model.*, inference.*, ...)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir / f"{job}.yaml")
    groups = [next(iter(d)) + ".*" for d in cfg.get("defaults", [])
              if not isinstance(d, str) and not next(iter(d)).startswith("override ")]  # "_self_" is a str
    return ", ".join([k for k in cfg.keys() if k not in ("defaults", "hydra")] + groups)


def check_command_line(job: str, argv: Sequence[str], sweeps: bool) -> "Namespace":
    """Parse `argv` as `@hydra.main` will and compose every job it would run (each combination of a
    `--multirun` sweep), raising ConfigError for the first problem. Hydra itself reports these with
    a traceback-like message and exit status 1. Returns the parsed arguments."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = get_args_parser()

    def refuse(message: str) -> None:  # argparse would print its usage and exit 2
        raise ConfigError(f"{message}; see --help")

    parser.error = refuse  # type: ignore[method-assign]
    args = parser.parse_args(list(argv))
    if args.multirun and not sweeps:
        raise ConfigError("--multirun is for fine-tuning sweeps (launch/finetune.py); run this job once per setting")
    if args.config_path is not None:
        raise ConfigError("--config-path replaces the project's conf/; use --config-dir DIR to add your own folder")
    commands = args.run + (args.cfg is not None) + args.multirun + args.shell_completion + (args.info is not None)
    if commands > 1:
        raise ConfigError("give only one of --run, --multirun, --cfg, --info and --shell-completion")
    if args.resolve and args.cfg is None and not args.help:
        raise ConfigError("--resolve goes with --cfg job (or --help)")
    jobs = [list(args.overrides)]
    if args.multirun:
        try:
            parsed = OverridesParser.create().parse_overrides(list(args.overrides))
            jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        except HydraException as e:
            raise _config_error(e, job, CONF_DIR) from None
    for overrides in jobs:
        load_config(job, overrides, config_name=args.config_name, config_dir=args.config_dir)
    return args


def resolve_path(p: str | None) -> Path | None:
    """Relative paths are relative to where the user ran the command (Hydra does not chdir here)."""
    return None if p in (None, "") else Path(p).expanduser().resolve()


def model_source(model_cfg: "DictConfig") -> "ModelSource":
    """`model.path`, else `model.preset` (seeded random weights), else the embedded demo."""
    from omegaconf import OmegaConf

    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.model.args import preset

    if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "path"):  # `path: ???` (model=mistral-7b, ...): no silent demo fallback
        raise ConfigError("this model config needs its checkpoint folder: set model.path=DIR")
    path = resolve_path(model_cfg.get("path"))
    if path is not None:
        return ModelSource.from_path(path)
    if model_cfg.get("preset"):
        return ModelSource(preset(model_cfg.preset), None, int(model_cfg.get("seed", 0)))
    return ModelSource.demo()


def make_plan(args: "ModelArgs", ctx: "ParallelContext", pipeline_cfg: "DictConfig", training: bool = False,
              virtual_stages: int = 1) -> "StagePlan":
    from pp_runtime.model.partition import plan_for

    return plan_for(args, ctx.pp_size, virtual_stages=virtual_stages, split=split_from_config(pipeline_cfg.get("split")),
                    training=training)


def split_from_config(split) -> Optional[list[int]]:
    """`pipeline.split` as a list of layer counts, or a one-line ConfigError (a string is not a list)."""
    if split is None:
        return None
    from omegaconf import ListConfig

    items = list(split) if isinstance(split, (list, tuple, ListConfig)) else None
    if items is None or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ConfigError(f"pipeline.split={split!r} must be a list of layers per stage, e.g. pipeline.split=[3,3,2]")
    return items
