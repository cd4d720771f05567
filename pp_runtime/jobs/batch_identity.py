"""What a batch output was computed from, kept beside it (`OUTPUT.job.json`).

Resuming skips the input line numbers already in the output, so a rerun on another input file or
with other settings would keep answers to the wrong prompts. The sidecar records the input's size and
content hash and the settings that change results (model, sampling, max_new_tokens); a resume that
does not match is refused before anything is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pp_runtime.errors import ConfigError
from pp_runtime.jobs.config import resolve_path
from pp_runtime.jobs.settings import GenerationSettings

FORMAT = "pp_runtime-batch-job-v1"


def input_identity(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def result_settings(cfg: GenerationSettings) -> dict[str, Any]:
    """The settings that change a line's result; not the topology or the engine's batching."""
    from pp_runtime.checkpoints.model_source import DEMO_DIR

    path = resolve_path(cfg.model.path)
    if path is None and not cfg.model.preset:
        path = DEMO_DIR
    model = {"path": str(path) if path is not None else None, "dtype": cfg.model.dtype}
    if path is None:
        model.update(preset=cfg.model.preset, seed=cfg.model.seed)
    adapter = resolve_path(cfg.model.adapter)
    if adapter is not None:  # a LoRA adapter changes every result (absent: the same identity as before adapters)
        model["adapter"] = str(adapter)
    return {
        "model": model,
        "sampling": dataclasses.asdict(cfg.sampling),
        "max_new_tokens": cfg.max_new_tokens,
    }


def job_identity(input_path: Path, cfg: GenerationSettings) -> dict[str, Any]:
    return {"format": FORMAT, "input": {"path": str(input_path), **input_identity(input_path)},
            "settings": result_settings(cfg)}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable fields that differ (the input's path may change; its content may not)."""
    out = []
    si, ni = saved.get("input", {}), now["input"]
    if (si.get("size"), si.get("sha256")) != (ni["size"], ni["sha256"]):
        out.append(f"input {si.get('path')} ({si.get('size')} bytes, sha256 {str(si.get('sha256'))[:12]}) vs "
                   f"{ni['path']} ({ni['size']} bytes, sha256 {ni['sha256'][:12]})")
    out += _diff(saved.get("settings", {}), now["settings"], "")
    return out


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')} {a!r} vs {b!r}"]


def check_identity(sidecar: Path, identity: dict[str, Any], has_results: bool, output: Path) -> None:
    """Refuse to resume results made from another input or with other settings."""
    if not has_results:
        return
    hint = "write to a new output=, or pass overwrite=true to discard the old results"
    if not sidecar.is_file():
        raise ConfigError(f"{output} holds results but no {sidecar.name} saying which input and settings made "
                          f"them, so they cannot be resumed safely; {hint}")
    try:
        saved = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{sidecar} is unreadable ({e}); {hint}") from None
    diff = differences(saved, identity)
    if diff:
        raise ConfigError(f"{output} holds results of another input or other settings ({'; '.join(diff)}); "
                          f"resume with the same input and settings, or {hint}")


def bind_identity(sidecar: Path, identity: dict[str, Any]) -> None:
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(tmp, sidecar)
