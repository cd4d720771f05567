"""Where a model's weights come from (a checkpoint folder, the embedded demo, or seeded random
weights of a preset shape) and how one stage of it is built on a device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pp_runtime.demo import MODEL_DIR as DEMO_DIR
from pp_runtime.errors import ConfigError
from pp_runtime.model.args import ModelArgs
from pp_runtime.model.partition import StageSpec
from pp_runtime.model.transformer import StageModule


DTYPES = {  # names a user may give (model.dtype, --dtype) -> torch dtype
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r}: use auto, float32, bfloat16, float16 or float64")
    return DTYPES[name]


@dataclass
class ModelSource:
    """Where weights come from: a checkpoint folder, or seeded random weights of a preset shape."""

    args: ModelArgs
    path: Optional[Path]
    seed: int = 0

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelSource":
        """A checkpoint folder (Mistral consolidated or Hugging Face)."""
        from pp_runtime.checkpoints.formats import load_model_args

        path = Path(path)
        return cls(load_model_args(path), path)

    @classmethod
    def demo(cls) -> "ModelSource":
        """The embedded demo model (pp_runtime/demo/model/)."""
        if not DEMO_DIR.exists():
            raise ConfigError(f"the embedded demo model is missing at {DEMO_DIR}; set model.path=DIR or model=random")
        return cls.from_path(DEMO_DIR)

    def build_stage(self, spec: StageSpec, dtype: torch.dtype, device: torch.device) -> StageModule:
        if self.path is not None:
            from pp_runtime.checkpoints.formats import load_stage_module

            return load_stage_module(self.path, self.args, spec, dtype, device)
        with torch.device("meta"):  # allocated once, in the target dtype: no float32 copy of a big model
            module = StageModule(self.args, spec).to(dtype)
        module = module.to_empty(device=device)
        init_random_(module, self.seed)
        return module


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded per parameter *name*: any stage split builds exactly the weights one process would,
    and the same ones `python -m pp_runtime.checkpoints.random_weights --device D` writes (stacked experts
    are filled expert by expert, each seeded by its checkpoint name). Drawn on the module's own
    device, so a GPU fills an 87 GB model in seconds."""
    from pp_runtime.checkpoints.formats import random_tensor
    from pp_runtime.model.moe import unstack_experts

    with torch.no_grad():
        for name, p in unstack_experts(dict(module.named_parameters())).items():
            p.copy_(random_tensor(name, p.shape, seed, p.dtype, device=p.device))
