"""Hydra configuration: compose a job's config from `conf/` plus command-line overrides, check a whole
Hydra command line before Hydra runs it (so a mistake is one `error:` line, exit 2), and turn the
config's model and pipeline groups into the library's own objects (nothing below jobs/ sees Hydra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pp_runtime.errors import ConfigError
from pp_runtime.jobs.settings import explain_bad_value, register_schemas, top_level_keys

if TYPE_CHECKING:
    from argparse import Namespace

    from omegaconf import DictConfig

    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.distributed.parallel import ParallelContext
    from pp_runtime.model.args import ModelArgs
    from pp_runtime.model.partition import StagePlan
    from pp_runtime.jobs.settings import ModelSettings, PipelineSettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_config(job: str, overrides: Sequence[str], conf_dir: Path = CONF_DIR, config_name: Optional[str] = None,
                config_dir: Optional[str] = None) -> "DictConfig":
    """Compose `conf/<job>.yaml` (or `config_name`, also looked up in `config_dir`) with overrides,
    exactly as Hydra's command line would; any problem becomes a one-line ConfigError."""
    from omegaconf import OmegaConf, open_dict

    cfg = _compose(job, list(overrides), conf_dir, config_name or job, config_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, True)
    _check_top_level_keys(cfg, job)
    return cfg


def _check_top_level_keys(cfg: "DictConfig", job: str) -> None:
    """Hydra merges whatever an added config sets: an experiment written for another job (or a
    `+key=...` typo) would otherwise ride along unused."""
    known = top_level_keys(job)
    unknown = [str(k) for k in cfg.keys() if k not in known]
    if unknown:
        raise _unknown_keys(unknown, job)


def _unknown_keys(keys: Sequence[str], job: str, where: str = "") -> ConfigError:
    return ConfigError(f"{where}the config sets {', '.join(keys)}, which {job} does not have (an experiment for another "
                       f"job, or a typo?); known keys: {_known_keys(job)}")


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
        raise _config_error(e, job) from None
    finally:
        GlobalHydra.instance().clear()


def _config_error(e: Exception, job: str) -> ConfigError:
    text = str(e).strip()
    cause = e.__cause__
    if text.startswith("Error merging override") and cause is not None:  # say why (a wrong type, ...)
        text = f"{text}: {str(cause).strip().splitlines()[0]}"
        own = explain_bad_value(job, str(getattr(cause, "full_key", "") or ""), getattr(cause, "value", None))
        if own is not None:  # the field's own check says it best; Hydra's words follow
            return ConfigError(f"bad override: {own} ({text.splitlines()[0]})")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    if "ConfigKeyError raised while composing" in text:  # an added config sets a key this job lacks
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "?")
        return _unknown_keys([key], job, where=f"{first.split(':')[0]}: ")
    hint = ""
    if "Could not override" in text or "not in struct" in text:
        hint = f"; known keys: {_known_keys(job)}"
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


def _known_keys(job: str) -> str:
    """Top-level keys of the job, groups as `model.*`, `inference.*`, ..."""
    return ", ".join(k + (".*" if group else "") for k, group in top_level_keys(job).items())


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
            raise _config_error(e, job) from None
    for overrides in jobs:
        load_config(job, overrides, config_name=args.config_name, config_dir=args.config_dir)
    return args


def resolve_path(p: str | None) -> Path | None:
    """Relative paths are relative to where the user ran the command (Hydra does not chdir here)."""
    return None if p in (None, "") else Path(p).expanduser().resolve()


def model_source(model: "ModelSettings") -> "ModelSource":
    """`model.path`, else `model.preset` (seeded random weights), else the embedded demo."""
    from pp_runtime.checkpoints.model_source import ModelSource
    from pp_runtime.model.args import preset

    path = resolve_path(model.path)
    if path is not None:
        return ModelSource.from_path(path)
    if model.preset:
        return ModelSource(preset(model.preset), None, model.seed)
    return ModelSource.demo()


def make_plan(args: "ModelArgs", ctx: "ParallelContext", pipeline: "PipelineSettings", training: bool = False,
              virtual_stages: int = 1) -> "StagePlan":
    from pp_runtime.model.partition import plan_for

    return plan_for(args, ctx.pp_size, virtual_stages=virtual_stages, split=split_from_config(pipeline.split),
                    training=training)


def split_from_config(split: Any) -> Optional[list[int]]:
    """`pipeline.split` as a list of layer counts, or a one-line ConfigError (a string is not a list)."""
    if split is None:
        return None
    items = list(split) if isinstance(split, (list, tuple)) else None
    if items is None or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ConfigError(f"pipeline.split={split!r} must be a list of layers per stage, e.g. pipeline.split=[3,3,2]")
    return items
