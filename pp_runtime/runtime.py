"""Build what a job needs from its config: process groups, the stage plan, this stage's weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from pp_runtime.args import ModelArgs, preset
from pp_runtime.config import resolve_path
from pp_runtime.errors import ConfigError
from pp_runtime.model import StageModule
from pp_runtime.parallel import ParallelContext
from pp_runtime.partition import StagePlan, StageSpec, plan_for

if TYPE_CHECKING:
    from omegaconf import DictConfig

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "model"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r}: use auto, float32, bfloat16, float16 or float64")
    return _DTYPES[name]


@dataclass
class ModelSource:
    """Where weights come from: a checkpoint folder, or seeded random weights of a preset shape."""

    args: ModelArgs
    path: Optional[Path]
    seed: int = 0

    @classmethod
    def from_config(cls, model_cfg: "DictConfig") -> "ModelSource":
        from omegaconf import OmegaConf

        if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "path"):  # `path: ???` (model=mistral-7b, ...): no silent demo fallback
            raise ConfigError("this model config needs its checkpoint folder: set model.path=DIR")
        path = resolve_path(model_cfg.get("path"))
        if path is not None:
            from pp_runtime.checkpoint import load_model_args

            return cls(load_model_args(path), path)
        if model_cfg.get("preset"):
            return cls(preset(model_cfg.preset), None, int(model_cfg.get("seed", 0)))
        if not DEMO_DIR.exists():
            raise ConfigError(f"the embedded demo model is missing at {DEMO_DIR}; set model.path=DIR or model=random")
        from pp_runtime.checkpoint import load_model_args

        return cls(load_model_args(DEMO_DIR), DEMO_DIR)

    def build_stage(self, spec: StageSpec, dtype: torch.dtype, device: torch.device) -> StageModule:
        if self.path is not None:
            from pp_runtime.checkpoint import load_stage_module

            return load_stage_module(self.path, self.args, spec, dtype, device)
        with torch.device("meta"):  # allocated once, in the target dtype: no float32 copy of a big model
            module = StageModule(self.args, spec).to(dtype)
        module = module.to_empty(device=device)
        init_random_(module, self.seed)
        return module


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded per parameter *name*: any stage split builds exactly the weights one process would,
    and the same ones `python -m pp_runtime.random_checkpoint --device D` writes (stacked experts
    are filled expert by expert, each seeded by its checkpoint name). Drawn on the module's own
    device, so a GPU fills an 87 GB model in seconds."""
    from pp_runtime.checkpoint import random_tensor
    from pp_runtime.moe import unstack_experts

    with torch.no_grad():
        for name, p in unstack_experts(dict(module.named_parameters())).items():
            p.copy_(random_tensor(name, p.shape, seed, p.dtype, device=p.device))


def make_plan(args: ModelArgs, ctx: ParallelContext, pipeline_cfg: "DictConfig", training: bool = False,
              virtual_stages: int = 1) -> StagePlan:
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
