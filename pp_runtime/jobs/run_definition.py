"""What makes two fine-tuning invocations the same run, so `resume=auto` never continues another one.

A run is defined by the model it starts from, its data and the settings that change its result;
the definition is stored in every checkpoint manifest (`run`). Not part of it, so they may change
between invocations of one run: `train.steps` (a resumed run continues up to the new number), the
pipeline layout and schedule (any split resumes to the same numbers), activation checkpointing,
and the checkpoint, metrics, timeline and export settings. The architecture is checked separately
(`train_checkpoint.check_same_model`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from pp_runtime.checkpoints.model_source import ModelSource
from pp_runtime.training.data import PackedDataset
from pp_runtime.jobs.settings import FinetuneSettings
from pp_runtime.training.lora import LoraConfig


def run_definition(cfg: FinetuneSettings, source: ModelSource, data: PackedDataset, dtype: torch.dtype,
                   lora: Optional[LoraConfig]) -> dict[str, Any]:
    """Setting name (as the user writes it) -> value, for the manifest and for comparing runs."""
    tcfg = cfg.train
    return {
        "model.path": str(source.path) if source.path is not None else None,
        "model.seed": source.seed if source.path is None else None,  # from scratch: the initial weights
        "model.dtype": str(dtype).removeprefix("torch."),
        "data": data.fingerprint(),  # the packed token rows: data.path, data.tokenizer, data.seq_len
        "data.shuffle": cfg.data.shuffle,
        "data.seed": cfg.data.seed,
        "train.batch_size": tcfg.batch_size,
        "train.lr": tcfg.lr,
        "train.min_lr": tcfg.min_lr,
        "train.warmup_steps": tcfg.warmup_steps,
        "train.weight_decay": tcfg.weight_decay,
        "train.betas": list(tcfg.betas),
        "train.eps": tcfg.eps,
        "train.grad_clip": tcfg.grad_clip,
        "train.master_weights": tcfg.master_weights,
        "train.lora": lora.to_json() if lora is not None else None,  # rank, alpha, dropout, targets, seed; None when off
    }


def _show(value: Any) -> str:
    if isinstance(value, dict):  # the data fingerprint
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return repr(value)


def differences(saved: Optional[Mapping[str, Any]], now: Mapping[str, Any]) -> list[str]:
    """`setting: checkpoint X vs now Y` for each setting that differs (empty: the same run)."""
    if saved is None:
        return ["the checkpoint has no run record (written by an older version)"]
    return [f"{k}: checkpoint {_show(saved.get(k))} vs now {_show(v)}" for k, v in now.items() if saved.get(k) != v]
