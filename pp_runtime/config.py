"""Hydra configuration: compose a job's config from `conf/` plus command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pp_runtime.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(job: str, overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> "DictConfig":
    """Compose `conf/<job>.yaml` with overrides; any problem becomes a one-line ConfigError."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=job):
            cfg = compose(config_name=job, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "Could not override" in str(e) or "not in struct" in str(e):
            hint = f"; known keys: {_known_keys(job, conf_dir)}"
        elif "Available options in" in str(e):
            hint = f"; choose one of {', '.join(_available_options(str(e)))}"
        elif "Error parsing override" in str(e):
            hint = """; quote a value that holds '=' or brackets, e.g. 'prompt="1+1="'"""
        raise ConfigError(f"bad override: {first}{hint}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def _known_keys(job: str, conf_dir: Path) -> str:
    """Top-level keys of the job plus its config groups (model.*, inference.*, ...)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir / f"{job}.yaml")
    groups = [next(iter(d)) + ".*" for d in cfg.get("defaults", []) if not isinstance(d, str)]  # "_self_" is a str
    return ", ".join([k for k in cfg.keys() if k != "defaults"] + groups)


def _available_options(message: str) -> list[str]:
    """The tab-indented names Hydra lists under "Available options in 'group':"."""
    names = []
    for line in message.split("Available options in", 1)[1].splitlines()[1:]:
        if not line.startswith("\t"):
            break
        names.append(line.strip())
    return names


def resolve_path(p: str | None) -> Path | None:
    """Relative paths are relative to where the user ran the command (Hydra does not chdir here)."""
    return None if p in (None, "") else Path(p).expanduser().resolve()
